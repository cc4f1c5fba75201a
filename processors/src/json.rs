//! Strict parsing of the JSON records operators write (content items, campaigns): one
//! object, nothing after it, and errors that name the field at fault.

use serde::de::DeserializeOwned;

/// Parse `bytes` as one JSON object of type `T`; the error is `path: what is wrong`
/// (just what is wrong at the top level).
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    // serde would also read a struct from an array (`["x"]` as its first field).
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err("expected a JSON object".into());
    }
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })?;
    json.end().map_err(|e| e.to_string())?;
    Ok(value)
}
