//! The Segment-compatible HTTP Tracking API: `POST /v1/{identify,track,page,screen,
//! group,alias,batch}` and analytics.js's short paths (`/v1/i`, `/v1/t`, ...), answered
//! as Segment answers them, so Segment's own libraries work unchanged against chorus.
//!
//! A call is checked whole before anything is written: the write key (basic auth or
//! `writeKey` in the body), the browser origin against the key's source, Segment's
//! limits (32 KB a message, 500 KB a batch, 2,500 messages), then every message is
//! mapped (`chorus_processors::tracking`). One bad message refuses the whole call, as
//! Segment does; a call accepted is on `events.raw` (acknowledged) before the 200.

use crate::auth::basic_user;
use crate::http::{count, event_key, produce, ApiState};
use crate::kafka::now_ms;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chorus_processors::topology::EVENTS_RAW;
use chorus_processors::tracking::{self, BatchDefaults, CallType, Receipt};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::io::Read as _;
use std::net::SocketAddr;

/// Segment's limits: a message, a batch call, messages in a batch.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
pub const MAX_BATCH_MESSAGES: usize = 2_500;

/// The Segment routes, long and short.
pub fn routes() -> Router<ApiState> {
    let mut router = Router::new();
    for (long, short) in [
        ("identify", "i"),
        ("track", "t"),
        ("page", "p"),
        ("screen", "s"),
        ("group", "g"),
        ("alias", "a"),
        ("batch", "b"),
    ] {
        let call = CallType::parse(long);
        for path in [long, short] {
            router = router.route(
                &format!("/v1/{path}"),
                post(move |state, addr, headers, body| receive(state, addr, headers, body, call)),
            );
        }
    }
    // analytics.js's own usage metrics go to `{apiHost}/m` when a site points apiHost at
    // chorus: accepted and dropped (they are about the library, not a customer).
    router.route("/v1/m", post(|| async { Json(json!({"success": true})) }))
}

/// A Segment-shaped refusal: `{"code", "message"}`, with the field when one is at fault.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, code, message: message.into(), field: None }
    }

    /// The field at fault; an empty one names none.
    fn on_field(mut self, field: impl Into<String>) -> Refusal {
        self.field = Some(field.into()).filter(|f| !f.is_empty());
        self
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            body["field"] = Value::String(field);
        }
        (self.status, Json(body)).into_response()
    }
}

/// `call` is the route's call type; `None` for a batch.
async fn receive(
    State(state): State<ApiState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
    call: Option<CallType>,
) -> Response {
    let route = format!("/v1/{}", call.map_or("batch", CallType::as_str));
    let response = match accept(&state, addr, &headers, &body, call).await {
        Ok(()) => (StatusCode::OK, Json(json!({"success": true}))).into_response(),
        Err(refusal) => refusal.into_response(),
    };
    count(&route, response.status());
    response
}

async fn accept(
    state: &ApiState,
    addr: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
    call: Option<CallType>,
) -> Result<(), Refusal> {
    let ip = Some(addr.ip());
    state.access.check_rate(ip).map_err(|e| Refusal::new(e.status(), "too_many_failures", e.message()))?;
    let limit = if call.is_none() { MAX_BATCH_BYTES } else { MAX_MESSAGE_BYTES };
    let body = decoded_body(headers, body, limit)?;
    if body.len() > limit {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is {} bytes; a {} call takes at most {limit}", body.len(), call_name(call)),
        ));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        Refusal::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    let Value::Object(object) = &value else {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", "the body must be a JSON object"));
    };

    // The write key: basic auth, or `writeKey` in the body (analytics.js's beacons).
    let from_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(basic_user);
    let from_body = match object.get("writeKey") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => {
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", "writeKey must be a string")
                .on_field("writeKey"))
        }
    };
    let Some(write_key) = from_header.or(from_body) else {
        state.access.record_failure(ip, "missing");
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a write key is required: basic auth with the key as user, or writeKey in the body",
        ));
    };
    let Some(source) = state.access.source_of(&write_key) else {
        state.access.record_failure(ip, "unknown_key");
        return Err(Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", "the write key is not valid"));
    };
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        if !source.allows_origin(origin) {
            state.access.record_failure(ip, "origin_not_allowed");
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("the origin {origin} is not in the allowed_origins of source {}", source.name),
            ));
        }
    }

    let (messages, defaults) = match call {
        Some(_) => (vec![(&value, body.len())], BatchDefaults::default()),
        None => batch_messages(object, &body)?,
    };
    let client_ip = addr.ip().to_string();
    let receipt =
        Receipt { source: &source.name, channel: &source.channel, received_at: now_ms(), ip: Some(&client_ip) };
    let mut events = Vec::with_capacity(messages.len());
    for (i, (message, size)) in messages.iter().enumerate() {
        let at = if call.is_none() { format!("batch[{i}]") } else { String::new() };
        if *size > MAX_MESSAGE_BYTES {
            let whose = if at.is_empty() { String::new() } else { format!("{at}: ") };
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                format!("{whose}a message is at most {MAX_MESSAGE_BYTES} bytes; this one is {size}"),
            )
            .on_field(at));
        }
        let event = tracking::to_event(message, call, &defaults, &receipt, &state.topology).map_err(|e| {
            let field = match (at.is_empty(), e.field.is_empty()) {
                (true, _) => e.field.clone(),
                (false, true) => at.clone(),
                (false, false) => format!("{at}.{}", e.field),
            };
            let message = if field.is_empty() { e.message.clone() } else { format!("{field}: {}", e.message) };
            Refusal::new(StatusCode::BAD_REQUEST, "invalid_message", message).on_field(field)
        })?;
        let kind = message.get("type").and_then(Value::as_str).or(call.map(CallType::as_str)).unwrap_or("track");
        events.push((event, kind.to_owned()));
    }

    let payloads: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|(event, _)| (event_key(&state.topology, event), serde_json::to_vec(event).unwrap_or_default()))
        .collect();
    let records: Vec<(&str, &[u8], Option<i32>)> =
        payloads.iter().map(|(key, bytes)| (key.as_str(), bytes.as_slice(), None)).collect();
    produce(state, EVENTS_RAW, &records)
        .await
        .map_err(|e| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", e.message()))?;
    for (_, kind) in &events {
        crate::metrics::metrics().tracking_messages.with_label_values(&[source.name.as_str(), kind]).inc();
    }
    Ok(())
}

fn call_name(call: Option<CallType>) -> &'static str {
    call.map_or("batch", CallType::as_str)
}

/// A message and its size as the client sent it.
type SizedMessage<'a> = (&'a Value, usize);

/// The messages of a batch with their size as sent, and what they share.
fn batch_messages<'a>(
    object: &'a Map<String, Value>,
    body: &[u8],
) -> Result<(Vec<SizedMessage<'a>>, BatchDefaults<'a>), Refusal> {
    let Some(Value::Array(batch)) = object.get("batch") else {
        return Err(Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", "batch must be an array of messages")
            .on_field("batch"));
    };
    if batch.len() > MAX_BATCH_MESSAGES {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "too_many_messages",
            format!("a batch holds at most {MAX_BATCH_MESSAGES} messages; this one has {}", batch.len()),
        )
        .on_field("batch"));
    }
    // The size of each message as the client wrote it (whitespace and escapes kept).
    #[derive(serde::Deserialize)]
    struct Raw {
        batch: Vec<Box<RawValue>>,
    }
    let sizes: Vec<usize> = serde_json::from_slice::<Raw>(body)
        .map(|raw| raw.batch.iter().map(|m| m.get().len()).collect())
        .unwrap_or_default();
    let messages = batch.iter().enumerate().map(|(i, m)| (m, sizes.get(i).copied().unwrap_or(0))).collect();
    let context = match object.get("context") {
        None | Some(Value::Null) => None,
        Some(Value::Object(c)) => Some(c),
        Some(_) => {
            return Err(Refusal::new(StatusCode::BAD_REQUEST, "invalid_request", "context must be an object")
                .on_field("context"))
        }
    };
    Ok((messages, BatchDefaults { context, sent_at: object.get("sentAt") }))
}

/// The body, gunzipped when it says so, refused past `limit` (checked while inflating:
/// a small bomb never becomes a large buffer).
fn decoded_body(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<Vec<u8>, Refusal> {
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(body.to_vec()),
        "gzip" | "x-gzip" => {
            let mut out = Vec::new();
            let mut reader = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
            reader.read_to_end(&mut out).map_err(|e| {
                Refusal::new(StatusCode::BAD_REQUEST, "invalid_encoding", format!("the body is not valid gzip: {e}"))
            })?;
            Ok(out)
        }
        other => Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("Content-Encoding {other:?} is not supported (gzip or none)"),
        )),
    }
}
