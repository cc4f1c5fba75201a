//! Avro for every topic. Each topic's value schema lives in `schemas/avro/*.avsc`; records
//! are framed with Avro's single-object encoding (`C3 01` + 8-byte Rabin fingerprint +
//! binary datum), so a reader finds the schema from the bytes alone and no registry is
//! needed. Free-form parts (traits, payload, nested snapshots) use the named record
//! `chorus.Json` holding JSON text; the codec maps it to and from plain JSON, so the
//! JSON and Avro forms of a record are interchangeable.

use apache_avro::schema::{Name, RecordSchema, Schema, UnionSchema};
use apache_avro::types::Value as AvroValue;
use apache_avro::{from_avro_datum, to_avro_datum};
use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use std::sync::OnceLock;

/// The two bytes that start an Avro single-object encoded record.
pub const AVRO_MAGIC: [u8; 2] = [0xC3, 0x01];

#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    #[error("no Avro schema is registered for topic `{0}`")]
    UnknownTopic(String),
    #[error("field `{path}`: {message}")]
    Shape { path: String, message: String },
    #[error("not Avro single-object encoding (missing C3 01 header)")]
    NotSingleObject,
    #[error("unknown Avro schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    #[error("corrupt Avro datum: {0}")]
    Corrupt(String),
}

struct Registered {
    name: &'static str,
    schema: Schema,
    fingerprint: u64,
}

const SOURCES: &[(&str, &str)] = &[
    ("event", include_str!("../avro/event.avsc")),
    // The event as written before the Segment-compatible intake added context fields:
    // still decoded (by its fingerprint), never written.
    ("event_v1", include_str!("../avro/event.v1.avsc")),
    ("dlq", include_str!("../avro/dlq.avsc")),
    ("resolved", include_str!("../avro/resolved.avsc")),
    ("merge", include_str!("../avro/merge.avsc")),
    ("graph", include_str!("../avro/graph.avsc")),
    ("review", include_str!("../avro/review.avsc")),
    ("segment", include_str!("../avro/segment.avsc")),
    ("profile", include_str!("../avro/profile.avsc")),
    ("context", include_str!("../avro/context.avsc")),
    ("decision", include_str!("../avro/decision.avsc")),
    ("suppressed", include_str!("../avro/suppressed.avsc")),
    ("deferred", include_str!("../avro/deferred.avsc")),
    ("journey_event", include_str!("../avro/journey_event.avsc")),
    ("message_request", include_str!("../avro/message_request.avsc")),
    ("consent", include_str!("../avro/consent.avsc")),
];

fn registry() -> &'static [Registered] {
    static REGISTRY: OnceLock<Vec<Registered>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        SOURCES
            .iter()
            .map(|(name, text)| {
                // The schemas are compiled in and covered by tests; a parse failure is a
                // build defect, not bad input.
                let schema = Schema::parse_str(text).unwrap_or_else(|e| panic!("schemas/avro/{name}.avsc: {e}"));
                let fingerprint = rabin(&schema);
                Registered { name, schema, fingerprint }
            })
            .collect()
    })
}

fn rabin(schema: &Schema) -> u64 {
    let fp = schema.fingerprint::<apache_avro::rabin::Rabin>();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&fp.bytes[..8]);
    u64::from_le_bytes(bytes)
}

/// The schema name (file stem) of a topic's values, if it has one.
pub fn schema_for_topic(topic: &str) -> Option<&'static str> {
    Some(match topic {
        "events.raw" => "event",
        "events.dlq" => "dlq",
        "events.resolved" => "resolved",
        "identity.merges" => "merge",
        "identity.graph" => "graph",
        "identity.review" => "review",
        "profiles" => "profile",
        "segments" => "segment",
        "context" => "context",
        "decisions.suppressed" => "suppressed",
        "decisions.deferred" => "deferred",
        "journeys.events" => "journey_event",
        "messages.requests" => "message_request",
        "consent" => "consent",
        t if t.starts_with("decisions.") => "decision",
        _ => return None,
    })
}

fn lookup(name: &str) -> Option<&'static Registered> {
    registry().iter().find(|r| r.name == name)
}

/// Encode a topic's JSON record as Avro single-object bytes.
pub fn encode_avro(topic: &str, json: &Value) -> Result<Vec<u8>, AvroError> {
    let reg = schema_for_topic(topic).and_then(lookup).ok_or_else(|| AvroError::UnknownTopic(topic.to_owned()))?;
    let mut names = HashMap::new();
    collect_names(&reg.schema, &mut names);
    let value = to_avro(json, &reg.schema, &names, "")?;
    let datum = to_avro_datum(&reg.schema, value).map_err(|e| AvroError::Corrupt(e.to_string()))?;
    let mut out = Vec::with_capacity(datum.len() + 10);
    out.extend_from_slice(&AVRO_MAGIC);
    out.extend_from_slice(&reg.fingerprint.to_le_bytes());
    out.extend_from_slice(&datum);
    Ok(out)
}

/// Decode Avro single-object bytes of any chorus schema to JSON; returns the schema name.
pub fn decode_avro(bytes: &[u8]) -> Result<(&'static str, Value), AvroError> {
    if bytes.len() < 10 || bytes[..2] != AVRO_MAGIC {
        return Err(AvroError::NotSingleObject);
    }
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&bytes[2..10]);
    let fingerprint = u64::from_le_bytes(fp);
    let reg =
        registry().iter().find(|r| r.fingerprint == fingerprint).ok_or(AvroError::UnknownFingerprint(fingerprint))?;
    let mut reader = &bytes[10..];
    let value = from_avro_datum(&reg.schema, &mut reader, None).map_err(|e| AvroError::Corrupt(e.to_string()))?;
    Ok((reg.name, to_json(value)))
}

fn collect_names<'a>(schema: &'a Schema, names: &mut HashMap<Name, &'a Schema>) {
    match schema {
        Schema::Record(r) => {
            names.insert(r.name.clone(), schema);
            for f in &r.fields {
                collect_names(&f.schema, names);
            }
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        _ => {}
    }
}

fn shape(path: &str, message: impl Into<String>) -> AvroError {
    AvroError::Shape { path: path.to_owned(), message: message.into() }
}

fn is_json_record(r: &RecordSchema) -> bool {
    r.name.name == "Json"
}

fn to_avro(json: &Value, schema: &Schema, names: &HashMap<Name, &Schema>, path: &str) -> Result<AvroValue, AvroError> {
    Ok(match schema {
        Schema::Null => match json {
            Value::Null => AvroValue::Null,
            _ => return Err(shape(path, "expected null")),
        },
        Schema::Boolean => AvroValue::Boolean(json.as_bool().ok_or_else(|| shape(path, "expected a boolean"))?),
        Schema::Int => {
            let n = json.as_i64().ok_or_else(|| shape(path, "expected an integer"))?;
            AvroValue::Int(i32::try_from(n).map_err(|_| shape(path, "integer out of range"))?)
        }
        Schema::Long => AvroValue::Long(json.as_i64().ok_or_else(|| shape(path, "expected an integer"))?),
        Schema::Double => AvroValue::Double(json.as_f64().ok_or_else(|| shape(path, "expected a number"))?),
        Schema::Float => AvroValue::Float(json.as_f64().ok_or_else(|| shape(path, "expected a number"))? as f32),
        Schema::String => AvroValue::String(json.as_str().ok_or_else(|| shape(path, "expected a string"))?.to_owned()),
        Schema::Array(a) => {
            let items = json.as_array().ok_or_else(|| shape(path, "expected an array"))?;
            AvroValue::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| to_avro(v, &a.items, names, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )
        }
        Schema::Map(m) => {
            let obj = json.as_object().ok_or_else(|| shape(path, "expected an object"))?;
            AvroValue::Map(
                obj.iter()
                    .map(|(k, v)| Ok((k.clone(), to_avro(v, &m.types, names, &join(path, k))?)))
                    .collect::<Result<_, AvroError>>()?,
            )
        }
        Schema::Union(u) => union_to_avro(json, u, names, path)?,
        Schema::Record(r) if is_json_record(r) => {
            AvroValue::Record(vec![("json".to_owned(), AvroValue::String(json.to_string()))])
        }
        Schema::Record(r) => {
            let obj = json.as_object().ok_or_else(|| shape(path, "expected an object"))?;
            let mut fields = Vec::with_capacity(r.fields.len());
            for f in &r.fields {
                let fpath = join(path, &f.name);
                let v = match obj.get(&f.name) {
                    Some(v) => to_avro(v, &f.schema, names, &fpath)?,
                    None => match &f.default {
                        Some(d) => to_avro(d, &f.schema, names, &fpath)?,
                        None => return Err(shape(&fpath, "is required")),
                    },
                };
                fields.push((f.name.clone(), v));
            }
            AvroValue::Record(fields)
        }
        Schema::Ref { name } => {
            let target = names.get(name).ok_or_else(|| shape(path, format!("unresolved schema reference {name}")))?;
            to_avro(json, target, names, path)?
        }
        other => return Err(shape(path, format!("unsupported Avro type {other:?}"))),
    })
}

fn union_to_avro(
    json: &Value,
    u: &UnionSchema,
    names: &HashMap<Name, &Schema>,
    path: &str,
) -> Result<AvroValue, AvroError> {
    let variants = u.variants();
    if json.is_null() {
        if let Some(i) = variants.iter().position(|v| matches!(v, Schema::Null)) {
            return Ok(AvroValue::Union(i as u32, Box::new(AvroValue::Null)));
        }
    }
    let mut last = None;
    for (i, v) in variants.iter().enumerate() {
        if matches!(v, Schema::Null) {
            continue;
        }
        match to_avro(json, v, names, path) {
            Ok(val) => return Ok(AvroValue::Union(i as u32, Box::new(val))),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| shape(path, "no union branch matches")))
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn to_json(value: AvroValue) -> Value {
    match value {
        AvroValue::Null => Value::Null,
        AvroValue::Boolean(b) => Value::Bool(b),
        AvroValue::Int(n) => Value::from(n),
        AvroValue::Long(n) => Value::from(n),
        AvroValue::Float(f) => Number::from_f64(f as f64).map(Value::Number).unwrap_or(Value::Null),
        AvroValue::Double(f) => Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null),
        AvroValue::String(s) | AvroValue::Enum(_, s) => Value::String(s),
        AvroValue::Union(_, inner) => to_json(*inner),
        AvroValue::Array(items) => Value::Array(items.into_iter().map(to_json).collect()),
        AvroValue::Map(m) => Value::Object(m.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        AvroValue::Record(fields) => {
            if fields.len() == 1 && fields[0].0 == "json" {
                if let AvroValue::String(text) = &fields[0].1 {
                    if let Ok(v) = serde_json::from_str(text) {
                        return v;
                    }
                }
            }
            Value::Object(fields.into_iter().map(|(k, v)| (k, to_json(v))).collect::<Map<_, _>>())
        }
        other => Value::String(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_schema_parses_with_a_distinct_fingerprint() {
        let reg = registry();
        assert_eq!(reg.len(), SOURCES.len());
        let mut fps: Vec<u64> = reg.iter().map(|r| r.fingerprint).collect();
        fps.sort();
        fps.dedup();
        assert_eq!(fps.len(), SOURCES.len());
    }

    #[test]
    fn event_round_trips_through_avro() {
        let event = json!({"event_id": "e1", "event_type": "order.completed", "timestamp": "2024-02-14T10:30:00Z",
            "customer_id": "c1", "anonymous_id": null, "session_id": null, "channel": "web",
            "context": {"device_type": null, "app_version": null, "geo": {"country": "AU"}, "ip": null,
                        "user_agent": null, "device_id": "d1", "timezone": null, "locale": null,
                        "library": {"name": "analytics.js", "version": "1.2"}, "campaign": null,
                        "page": {"url": "https://shop.example/p/1"}, "source": "website",
                        "original_timestamp": "2024-02-14T10:40:00Z", "sent_at": "2024-02-14T10:40:01Z",
                        "received_at": "2024-02-14T10:30:01Z"},
            "identifiers": {"email": "a@b.c"}, "traits": {"name": "Ann"},
            "payload": {"order_id": "o1", "total": 12.5, "items": [{"sku": "x"}]}});
        let bytes = encode_avro("events.raw", &event).unwrap();
        assert_eq!(&bytes[..2], &AVRO_MAGIC);
        let (name, back) = decode_avro(&bytes).unwrap();
        assert_eq!(name, "event");
        assert_eq!(back, event);
    }

    #[test]
    fn events_written_with_the_first_event_schema_still_decode() {
        let event = json!({"event_id": "e1", "event_type": "page.viewed", "timestamp": "2024-02-14T10:30:00Z",
            "customer_id": "c1", "anonymous_id": null, "session_id": null, "channel": "web",
            "context": {"device_type": null, "app_version": null, "geo": null, "ip": "10.0.0.1",
                        "user_agent": null, "device_id": null, "timezone": null, "locale": null},
            "identifiers": {}, "traits": null, "payload": {"url": "/"}});
        let v1 = lookup("event_v1").unwrap();
        let mut names = HashMap::new();
        collect_names(&v1.schema, &mut names);
        let datum = to_avro_datum(&v1.schema, to_avro(&event, &v1.schema, &names, "").unwrap()).unwrap();
        let mut bytes = AVRO_MAGIC.to_vec();
        bytes.extend_from_slice(&v1.fingerprint.to_le_bytes());
        bytes.extend_from_slice(&datum);
        let (name, back) = decode_avro(&bytes).unwrap();
        assert_eq!(name, "event_v1");
        assert_eq!(back, event);
        assert!(crate::Event::from_json(&back).is_ok());
    }

    #[test]
    fn missing_required_field_names_its_path() {
        let err = encode_avro("identity.merges", &json!({"from": "a", "into": "b"})).unwrap_err();
        assert_eq!(err.to_string(), "field `rule`: is required");
    }

    #[test]
    fn garbage_is_not_decoded() {
        assert!(matches!(decode_avro(b"{\"a\":1}"), Err(AvroError::NotSingleObject)));
        let mut bytes =
            encode_avro("consent", &json!({"purpose": "analytics", "granted": true, "timestamp": "t"})).unwrap();
        bytes[3] ^= 0xff;
        assert!(matches!(decode_avro(&bytes), Err(AvroError::UnknownFingerprint(_))));
    }
}
