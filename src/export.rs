//! The portability export as a zip: `export.json` (the whole document, as
//! `GET .../export` answers it) and one CSV per kind of record (RFC 4180, UTF-8, with a
//! header row; nested values are written as JSON text), for a subject to take elsewhere.

use anyhow::{Context as _, Result};
use serde_json::Value;
use std::io::Write as _;

/// One CSV file of the zip: its name, header and rows.
struct Table {
    name: &'static str,
    header: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(name: &'static str, header: &'static [&'static str]) -> Table {
        Table { name, header, rows: Vec::new() }
    }

    /// A row of `fields` read from `record` (missing ones empty).
    fn push_fields(&mut self, record: &Value, prefix: &[String]) {
        let mut row = prefix.to_vec();
        row.extend(self.header[prefix.len()..].iter().map(|field| cell(record.get(*field))));
        self.rows.push(row);
    }

    fn csv(&self) -> Result<Vec<u8>> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record(self.header)?;
        for row in &self.rows {
            writer.write_record(row)?;
        }
        writer.into_inner().context("cannot finish a CSV file")
    }
}

/// A JSON value as a CSV cell: strings as they are, null as empty, anything else as JSON.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn items<'a>(value: &'a Value, path: &[&str]) -> impl Iterator<Item = &'a Value> {
    let found = path.iter().try_fold(value, |v, key| v.get(*key));
    found.and_then(Value::as_array).into_iter().flatten()
}

/// The tables of an export document.
fn tables(export: &Value) -> Vec<Table> {
    let mut identifiers = Table::new("identifiers.csv", &["type", "value", "rule", "score", "first_seen"]);
    for id in items(export, &["identity", "identifiers"]) {
        identifiers.push_fields(id, &[]);
    }
    let mut merges = Table::new("merges.csv", &["from", "into", "rule", "score", "identifiers", "at"]);
    for merge in items(export, &["identity", "history"]) {
        merges.push_fields(merge, &[]);
    }
    let mut attributes = Table::new("attributes.csv", &["canonical_id", "name", "value", "at", "source"]);
    let mut history = Table::new("attribute_history.csv", &["canonical_id", "name", "at", "source", "request_id"]);
    let mut activity =
        Table::new("recent_activity.csv", &["canonical_id", "type", "channel", "at", "event_id", "details"]);
    let mut segments = Table::new("segments.csv", &["canonical_id", "segment"]);
    for profile in items(export, &["profile_state"]) {
        let id = cell(profile.get("canonical_id"));
        for (name, attr) in profile.get("attributes").and_then(Value::as_object).into_iter().flatten() {
            let mut row = vec![id.clone(), name.clone()];
            row.extend(["value", "at", "source"].iter().map(|f| cell(attr.get(*f))));
            attributes.rows.push(row);
        }
        for change in items(profile, &["attribute_history"]) {
            history.push_fields(change, std::slice::from_ref(&id));
        }
        for a in items(profile, &["recent_activity"]) {
            activity.push_fields(a, std::slice::from_ref(&id));
        }
        for segment in items(profile, &["segments"]) {
            segments.rows.push(vec![id.clone(), cell(Some(segment))]);
        }
    }
    let mut consent = Table::new("consent_history.csv", &["purpose", "granted", "at", "source"]);
    let mut sent = Table::new("messages_sent.csv", &["at", "channel", "category", "capped", "request_id"]);
    let mut pending = Table::new("messages_pending.csv", &["request_id", "category", "arrived", "due", "hold"]);
    for messaging in items(export, &["messaging"]) {
        let recipient = &messaging["recipient"];
        for entry in items(recipient, &["history"]) {
            consent.push_fields(entry, &[]);
        }
        for s in items(recipient, &["sends"]) {
            sent.push_fields(s, &[]);
        }
        for p in items(recipient, &["pending"]) {
            let request = &p["request"];
            pending.rows.push(vec![
                cell(request.get("request_id")),
                cell(request.get("category")),
                cell(p.get("arrived")),
                cell(p.get("due")),
                cell(p.get("hold")),
            ]);
        }
    }
    let mut journeys = Table::new("journeys.csv", &["journey", "entered_at", "step", "due", "channels"]);
    for state in items(export, &["journeys"]) {
        for (name, instance) in state.get("active").and_then(Value::as_object).into_iter().flatten() {
            journeys.push_fields(instance, std::slice::from_ref(name));
        }
    }
    let mut cart = Table::new("cart.csv", &["canonical_id", "product_id", "category", "quantity", "price"]);
    let mut interactions = Table::new("interactions.csv", &["canonical_id", "event_type", "channel", "at", "details"]);
    for context in items(export, &["context"]) {
        let id = cell(context.get("canonical_id"));
        for line in items(context, &["cart", "items"]) {
            cart.push_fields(line, std::slice::from_ref(&id));
        }
        for i in items(context, &["recent_interactions"]) {
            interactions.push_fields(i, std::slice::from_ref(&id));
        }
    }
    vec![
        identifiers,
        merges,
        attributes,
        history,
        activity,
        segments,
        consent,
        sent,
        pending,
        journeys,
        cart,
        interactions,
    ]
}

/// The zip of an export document.
pub fn zip(export: &Value) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("export.json", options)?;
    zip.write_all(&serde_json::to_vec_pretty(export)?)?;
    for table in tables(export) {
        zip.start_file(table.name, options)?;
        zip.write_all(&table.csv()?)?;
    }
    Ok(zip.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_csv_files_hold_what_the_json_holds() {
        let export = json!({
            "identity": {"identifiers": [{"type": "email", "value": "a,\"b\"@x.co", "rule": "deterministic", "first_seen": 5}],
                         "history": []},
            "profile_state": [{"canonical_id": "cus_1", "attributes": {"first_name": {"value": "Ann", "at": 1, "source": "web"}},
                               "segments": ["vip"], "recent_activity": [], "attribute_history": []}],
            "messaging": [{"recipient": {"history": [{"purpose": "marketing_email", "granted": true, "at": 2, "source": null}],
                                         "sends": [], "pending": []}}],
            "journeys": [], "context": [],
        });
        let bytes = zip(&export).unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let read = |archive: &mut zip::ZipArchive<_>, name: &str| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut archive.by_name(name).unwrap(), &mut text).unwrap();
            text
        };
        let json: Value = serde_json::from_str(&read(&mut archive, "export.json")).unwrap();
        assert_eq!(json, export);
        let ids = read(&mut archive, "identifiers.csv");
        let mut reader = csv::Reader::from_reader(ids.as_bytes());
        let row = reader.records().next().unwrap().unwrap();
        assert_eq!(&row[1], "a,\"b\"@x.co", "quoted as RFC 4180 says");
        assert_eq!(
            read(&mut archive, "attributes.csv"),
            "canonical_id,name,value,at,source\ncus_1,first_name,Ann,1,web\n"
        );
        assert_eq!(read(&mut archive, "segments.csv"), "canonical_id,segment\ncus_1,vip\n");
        assert!(read(&mut archive, "consent_history.csv").contains("marketing_email,true,2,"));
    }
}
