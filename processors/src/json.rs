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

/// A JSON document (an object or null) kept as its text: a snapshot another stage
/// published, held by a stage that only sometimes looks inside. Stored and copied as
/// bytes, parsed only when read ([`JsonText::value`]).
///
/// JSON serialisers get the document itself; the binary store encoding gets the text as
/// one string. Either reads back in either format (a stored value read generically holds
/// the text); so a document that is itself a JSON string is not representable.
#[derive(Debug, Clone)]
pub struct JsonText(std::sync::Arc<serde_json::value::RawValue>);

impl JsonText {
    /// Check that `bytes` are one JSON document, without building it.
    pub fn parse(bytes: &[u8]) -> Result<JsonText, serde_json::Error> {
        let raw: Box<serde_json::value::RawValue> = serde_json::from_slice(bytes)?;
        Ok(JsonText(raw.into()))
    }

    /// `text`, checked to be one JSON document.
    pub fn from_text(text: String) -> Result<JsonText, serde_json::Error> {
        Ok(JsonText(serde_json::value::RawValue::from_string(text)?.into()))
    }

    /// `value` written as JSON text.
    pub fn write<T: serde::Serialize + ?Sized>(value: &T) -> Result<JsonText, serde_json::Error> {
        Ok(JsonText(serde_json::value::to_raw_value(value)?.into()))
    }

    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// The document, parsed (null if the text is somehow not JSON: it was checked).
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or(serde_json::Value::Null)
    }
}

/// `null`.
impl Default for JsonText {
    fn default() -> JsonText {
        JsonText(Box::<serde_json::value::RawValue>::default().into())
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &JsonText) -> bool {
        self.text() == other.text()
    }
}

impl serde::Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.0.serialize(serializer)
        } else {
            serializer.serialize_str(self.text())
        }
    }
}

impl<'de> serde::Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<JsonText, D::Error> {
        use serde::de::Error;
        let raw = match serde_json::Value::deserialize(deserializer)? {
            // The stored form.
            serde_json::Value::String(text) => serde_json::value::RawValue::from_string(text),
            // The document itself (JSON, or a binary value written before this type).
            document => serde_json::value::to_raw_value(&document),
        };
        raw.map(|raw| JsonText(raw.into())).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::JsonText;
    use serde_json::json;

    #[test]
    fn a_json_text_round_trips_through_json_the_store_encoding_and_a_generic_read() {
        let doc = JsonText::parse(br#"{"cart": {"items": [1, 2]}, "n": 1.5}"#).unwrap();
        assert_eq!(doc.value(), json!({"cart": {"items": [1, 2]}, "n": 1.5}));
        assert_eq!(serde_json::to_value(&doc).unwrap(), doc.value(), "JSON gets the document");
        let from_json: JsonText = serde_json::from_slice(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(from_json.value(), doc.value());
        let stored = crate::cache::encode(&doc).unwrap();
        assert_eq!(crate::cache::decode::<JsonText>(&stored).unwrap(), doc);
        let generic: serde_json::Value = crate::cache::decode(&stored).unwrap();
        assert_eq!(serde_json::from_value::<JsonText>(generic).unwrap().value(), doc.value());
        // A value stored as a document before (MessagePack of the object) still reads.
        let old = crate::cache::encode(&json!({"a": 1})).unwrap();
        assert_eq!(crate::cache::decode::<JsonText>(&old).unwrap().value(), json!({"a": 1}));
        assert!(JsonText::parse(b"{not json").is_err());
    }
}
