//! The HTTP API (axum): event intake (chorus's own and Segment's, `tracking.rs`),
//! Customer 360 profile and context reads, content previews, identity and privacy
//! operations, visitor tokens, health, readiness and Prometheus metrics. Every route but
//! the open ones checks its caller's key and scope (`auth.rs`). Errors are JSON
//! `{"error": {"code", "message"}}` with the matching 4xx/5xx status.

use crate::auth::{Access, Caller};
use crate::kafka::{client_config, now_ms};
use crate::metrics::{metrics, render};
use crate::query::{Consistency, Lookup, PreviewError, Query};
use anyhow::{Context as _, Result};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query as Params, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chorus_processors::access::Scope;
use chorus_processors::content::CHANNELS;
use chorus_processors::identity::{self, Identifier};
use chorus_processors::privacy::{self, status, status::RequestState, PrivacyRequest, RequestType};
use chorus_processors::topology::{Clock, CONSENT, EVENTS_RAW, IDENTITY_REPARTITION};
use chorus_processors::Topology;
use chorus_schemas::{ConsentChange, Event};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct ApiState {
    pub topology: Arc<Topology>,
    pub query: Query,
    pub producer: FutureProducer,
    /// Write keys, secret keys, visitor tokens, the cluster secret.
    pub access: Arc<Access>,
}

impl ApiState {
    pub fn new(brokers: &str, query: Query, access: Arc<Access>) -> Result<ApiState> {
        let topology = query.topology.clone();
        let producer: FutureProducer = client_config(brokers)
            .set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "10000")
            .set("message.max.bytes", topology.limits.max_message_bytes().to_string())
            .create()
            .context("cannot create the HTTP intake producer")?;
        Ok(ApiState { topology, query, producer, access })
    }
}

/// Every route, with the credential it takes (README, "Access control"): the customer
/// reads and consent check their caller themselves (secret keys, visitor tokens, write
/// keys for anonymous visitors); `secret(scope, ...)` routes take a secret key with the
/// scope, checked before the handler runs.
pub fn router(state: ApiState) -> Router {
    let secret = |scope, label, route| keyed(&state, scope, label, route);
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/profiles/{identifier}", get(|s, a, h, p, q| customer_read(CustomerRead::Profile, s, a, h, p, q)))
        .route("/v1/context/{identifier}", get(|s, a, h, p, q| customer_read(CustomerRead::Context, s, a, h, p, q)))
        .route(
            "/v1/recommendations/{identifier}",
            get(|s, a, h, p, q| customer_read(CustomerRead::Recommendations, s, a, h, p, q)),
        )
        .route("/v1/instances", secret(Scope::ReadInstances, "/v1/instances", get(get_instances)))
        .route(
            "/v1/consent/{identifier}",
            get(|s, a, h, p, q| customer_read(CustomerRead::Consent, s, a, h, p, q)).put(put_consent),
        )
        .route("/v1/content/{id}", secret(Scope::ReadContent, "/v1/content", get(get_content_preview)))
        .route("/internal/v1/stores/{processor}/{partition}/{store}", get(get_store_value))
        .route("/v1/identity/unlink", secret(Scope::AdminIdentity, "/v1/identity/unlink", post(post_unlink)))
        .route("/v1/identity/{kind}/{value}", secret(Scope::ReadIdentity, "/v1/identity", get(get_identity)))
        .route("/v1/privacy/requests", secret(Scope::AdminPrivacy, "/v1/privacy/requests", post(post_privacy_request)))
        .route("/v1/privacy/unsuppress", secret(Scope::AdminPrivacy, "/v1/privacy/unsuppress", post(post_unsuppress)))
        .route(
            "/v1/privacy/requests/{id}",
            secret(Scope::AdminPrivacy, "/v1/privacy/requests/{id}", get(get_privacy_request)),
        )
        .route(
            "/v1/privacy/requests/{id}/export",
            secret(Scope::AdminPrivacy, "/v1/privacy/requests/{id}/export", get(get_privacy_export)),
        )
        .route(
            "/v1/privacy/requests/{id}/export.zip",
            secret(Scope::AdminPrivacy, "/v1/privacy/requests/{id}/export.zip", get(get_privacy_export_zip)),
        )
        .route("/metrics", open_or_keyed(&state, "metrics", get(get_metrics)))
        .route("/v1/tokens", secret(Scope::AdminTokens, "/v1/tokens", post(post_token)))
        .route("/healthz", open_or_keyed(&state, "healthz", get(healthz)))
        .route("/readyz", open_or_keyed(&state, "readyz", get(readyz)))
        .merge(crate::tracking::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::map_response(json_body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), cors))
        .layer(axum::middleware::from_fn_with_state(state.clone(), client_address))
        .layer(DefaultBodyLimit::max(body_limit(&state.topology)))
        .with_state(state)
}

/// `route` behind a check for a secret key with `scope`; a refusal is counted under `label`.
fn keyed(
    state: &ApiState,
    scope: Scope,
    label: &'static str,
    route: axum::routing::MethodRouter<ApiState>,
) -> axum::routing::MethodRouter<ApiState> {
    route.route_layer(axum::middleware::from_fn_with_state((state.clone(), scope, label), require_secret))
}

async fn require_secret(
    State((state, scope, label)): State<(ApiState, Scope, &'static str)>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match secret(&state, request.headers(), addr, scope) {
        Ok(()) => next.run(request).await,
        Err(e) => counted(label, e),
    }
}

/// The largest request body: a batch of events up to the intake's own limits, and at
/// least one record of `limits.max_record_bytes` with room for its envelope.
fn body_limit(topology: &Topology) -> usize {
    topology.limits.max_message_bytes().max(4 << 20)
}

/// Bodies over the limit are refused by axum with a plain-text 413; every error of this
/// API is JSON, so that one is too.
async fn json_body_limit(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body exceeds the size limit",
        )
        .into_response();
    }
    response
}

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The request field at fault, when there is one.
    field: Option<String>,
    /// Seconds, for a `Retry-After` header.
    retry_after: Option<i64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field: None, retry_after: None }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> String {
        self.message.clone()
    }

    pub fn retry_after(mut self, seconds: i64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn on_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            error["field"] = Value::String(field);
        }
        let mut response = (self.status, Json(json!({"error": error}))).into_response();
        if let Some(seconds) = self.retry_after {
            if let Ok(v) = header::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"chorus\""));
        }
        response
    }
}

/// A handler's JSON answer (`ok` with the value, or the error), counted under `route`.
fn answer(route: &str, ok: StatusCode, result: Result<Value, ApiError>) -> Response {
    let response = match result {
        Ok(v) => (ok, Json(v)).into_response(),
        Err(e) => e.into_response(),
    };
    count(route, response.status());
    response
}

pub(crate) fn count(route: &str, status: StatusCode) {
    metrics().http_requests.with_label_values(&[route, status.as_str()]).inc();
}

/// The key an event is produced under: its most specific identifier (`type:value`), so
/// it lands on the partition whose identity task owns that identifier.
pub fn event_key(topology: &Topology, event: &Event) -> String {
    identity::partition_key(&topology.identity, event).unwrap_or_else(|| event.event_id.clone())
}

async fn post_events(
    State(state): State<ApiState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // A source's write key (as the Segment routes take) or a secret key with write:events.
    let result = match state.access.caller(&headers, Some(addr.ip()), Scope::WriteEvents) {
        Ok(Caller::Visitor(_)) => Err(state.access.fail(
            Some(addr.ip()),
            "insufficient_scope",
            ApiError::new(StatusCode::FORBIDDEN, "insufficient_scope", "a visitor token does not send events"),
        )),
        Ok(_) => accept_events(&state, &body).await,
        Err(e) => Err(e),
    };
    let status = match &result {
        Ok(_) => StatusCode::ACCEPTED,
        Err(e) => e.status,
    };
    count("/v1/events", status);
    result.map(|n| (StatusCode::ACCEPTED, Json(json!({"accepted": n}))).into_response())
}

async fn accept_events(state: &ApiState, body: &[u8]) -> Result<usize, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("request body is not valid JSON: {e}"))
    })?;
    let items: Vec<Value> = match value {
        Value::Object(mut obj) if obj.contains_key("batch") => match obj.remove("batch") {
            Some(Value::Array(items)) if !items.is_empty() => items,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_batch",
                    "`batch` must be a non-empty array of events",
                ))
            }
        },
        other => vec![other],
    };
    // Validate the whole batch first: a batch is accepted whole or not at all.
    let max = state.topology.limits.max_record_bytes;
    let mut prepared = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = if items.len() > 1 { format!("batch[{i}]: ") } else { String::new() };
        let event = Event::from_json(item)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_event", format!("{at}{e}")))?;
        if !state.topology.is_known_event_type(&event.event_type) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_event_type",
                format!("{at}event_type {:?} is not in the topology's event_types", event.event_type),
            ));
        }
        let bytes = item.to_string().into_bytes();
        if bytes.len() > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "oversized",
                format!("{at}event of {} bytes exceeds limits.max_record_bytes ({max})", bytes.len()),
            ));
        }
        prepared.push((event, bytes));
    }
    let partitions = state.topology.partitions_of(EVENTS_RAW) as i32;
    let keys: Vec<String> = prepared.iter().map(|(event, _)| event_key(&state.topology, event)).collect();
    let mut records = Vec::new();
    for ((event, bytes), key) in prepared.iter().zip(&keys) {
        let targets: Vec<Option<i32>> =
            if event.event_type == "system.tick" { (0..partitions).map(Some).collect() } else { vec![None] };
        records.extend(targets.into_iter().map(|partition| (key.as_str(), bytes.as_slice(), partition)));
    }
    produce(state, EVENTS_RAW, &records).await?;
    Ok(prepared.len())
}

/// Write records (key, value, partition or the key's) to `topic` and wait until every
/// one is acknowledged; `503 broker_unavailable` when one is not.
pub(crate) async fn produce(
    state: &ApiState,
    topic: &str,
    records: &[(&str, &[u8], Option<i32>)],
) -> Result<(), ApiError> {
    let deliveries = records.iter().map(|(key, value, partition)| {
        let mut record = FutureRecord::to(topic).key(*key).payload(*value).timestamp(now_ms());
        if let Some(p) = partition {
            record = record.partition(*p);
        }
        state.producer.send(record, Duration::from_secs(10))
    });
    for delivery in futures::future::join_all(deliveries).await {
        delivery.map_err(|(e, _)| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                format!("could not write to {topic}: {e}"),
            )
        })?;
    }
    Ok(())
}

fn lookup_response(route: &str, kind: &str, identifier: &str, lookup: Lookup<Value>) -> Response {
    let response = match lookup {
        Lookup::Found(v) => (StatusCode::OK, Json(v)).into_response(),
        Lookup::Unknown => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no {kind} for identifier {identifier:?}"))
                .into_response()
        }
        Lookup::Unavailable(why) => {
            unavailable(format!("the {kind} of {identifier:?} cannot be read right now: {why}"))
        }
    };
    count(route, response.status());
    response
}

/// 503 with a retry hint: the answer exists but nobody can give it this moment.
fn unavailable(message: String) -> Response {
    let mut r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", message).into_response();
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// Reads apply expiry with the wall clock; under `clock: event` only the tasks know
/// event time, so reads show what they last wrote.
fn read_clock(state: &ApiState) -> Option<i64> {
    (state.topology.clock == Clock::Wall).then(now_ms)
}

/// `?consistency=live` (the default: the serving task's current state) or `committed`.
#[derive(serde::Deserialize)]
struct ReadParams {
    #[serde(default)]
    consistency: Consistency,
}

/// The queries a read asks for, or its JSON 400.
fn reader(state: &ApiState, params: Result<Params<ReadParams>, QueryRejection>) -> Result<Query, ApiError> {
    let Params(p) = params.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{} (consistency is `live` or `committed`)", e.body_text()),
        )
    })?;
    Ok(state.query.with_consistency(p.consistency))
}

/// An error answer, counted for its route.
fn counted(route: &str, e: ApiError) -> Response {
    let response = e.into_response();
    count(route, response.status());
    response
}

type ReadQuery = Result<Params<ReadParams>, QueryRejection>;

/// The customer reads, each with its route, its name in messages and the scope it needs.
#[derive(Clone, Copy)]
enum CustomerRead {
    Profile,
    Context,
    Recommendations,
    Consent,
}

impl CustomerRead {
    fn route(self) -> &'static str {
        match self {
            CustomerRead::Profile => "/v1/profiles",
            CustomerRead::Context => "/v1/context",
            CustomerRead::Recommendations => "/v1/recommendations",
            CustomerRead::Consent => "/v1/consent",
        }
    }

    fn scope(self) -> Scope {
        match self {
            CustomerRead::Profile => Scope::ReadProfiles,
            CustomerRead::Context => Scope::ReadContext,
            CustomerRead::Recommendations => Scope::ReadRecommendations,
            CustomerRead::Consent => Scope::ReadConsent,
        }
    }

    /// What a browser shows an anonymous visitor with only the site's write key.
    fn anonymous(self) -> bool {
        matches!(self, CustomerRead::Context | CustomerRead::Recommendations)
    }
}

/// `GET /v1/{profiles,context,recommendations,consent}/{identifier}`.
async fn customer_read(
    read: CustomerRead,
    State(state): State<ApiState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
    params: ReadQuery,
) -> Response {
    let state = &state;
    let identifier = match customer_access(state, &headers, addr, read.scope(), &identifier, read.anonymous()).await {
        Ok(i) => i,
        Err(e) => return counted(read.route(), e),
    };
    let query = match reader(state, params) {
        Ok(q) => q,
        Err(e) => return counted(read.route(), e),
    };
    let (kind, lookup) = match read {
        CustomerRead::Profile => ("profile", query.profile(&identifier, read_clock(state)).await),
        CustomerRead::Context => ("context", query.context(&identifier, read_clock(state)).await),
        CustomerRead::Recommendations => {
            ("recommendations", query.recommendations(&identifier, read_clock(state)).await)
        }
        CustomerRead::Consent => ("consent", query.consent(&identifier).await),
    };
    lookup_response(read.route(), kind, &identifier, lookup)
}

/// The identifier a read or change about one customer goes through, if the caller may:
/// a secret key with `scope` for anyone; a visitor token with `scope` for its own
/// customer only (`me`, or any identifier of theirs); and, where `anonymous`, the
/// site's write key for an anonymous visitor's own `anonymous_id:...` while that
/// visitor is not linked to a known customer.
async fn customer_access(
    state: &ApiState,
    headers: &HeaderMap,
    addr: SocketAddr,
    scope: Scope,
    identifier: &str,
    anonymous: bool,
) -> Result<String, ApiError> {
    let ip = Some(addr.ip());
    let refuse = |reason: &'static str, status, message: String| {
        Err(state.access.fail(ip, reason, ApiError::new(status, reason, message)))
    };
    match state.access.caller(headers, ip, scope)? {
        Caller::Secret(_) if identifier == "me" => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_identifier",
            "`me` names the customer of a visitor token; a secret key names the customer",
        )),
        Caller::Secret(_) => Ok(identifier.to_owned()),
        Caller::Visitor(subject) => {
            if identifier == "me" || identifier == subject {
                return Ok(subject);
            }
            match (state.query.resolve(&subject).await, state.query.resolve(identifier).await) {
                (Lookup::Found(a), Lookup::Found(b)) if a == b => Ok(identifier.to_owned()),
                (Lookup::Unavailable(why), _) | (_, Lookup::Unavailable(why)) => {
                    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", why).retry_after(1))
                }
                _ => refuse(
                    "wrong_customer",
                    StatusCode::FORBIDDEN,
                    "a visitor token answers only for its own customer".to_owned(),
                ),
            }
        }
        Caller::WriteKey(_) if !anonymous => refuse(
            "insufficient_scope",
            StatusCode::FORBIDDEN,
            format!(
                "a write key only sends events; this read needs a secret key or visitor token with {}",
                scope.as_str()
            ),
        ),
        Caller::WriteKey(source) => {
            if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
                if !source.allows_origin(origin) {
                    return refuse(
                        "origin_not_allowed",
                        StatusCode::FORBIDDEN,
                        format!("the origin {origin} is not in the allowed_origins of source {}", source.name),
                    );
                }
            }
            let anonymous_id = identifier
                .strip_prefix("anonymous_id:")
                .and_then(|value| Identifier::parse(&state.topology.identity, "anonymous_id", value).ok());
            let Some(id) = anonymous_id else {
                return refuse(
                    "token_required",
                    StatusCode::FORBIDDEN,
                    "a write key reads only an anonymous visitor's own data (anonymous_id:<id>); use a visitor token"
                        .to_owned(),
                );
            };
            match state.query.identity(&id.label()).await {
                Lookup::Found(component) => {
                    let known = component["identifiers"]
                        .as_array()
                        .is_some_and(|ids| ids.iter().any(|i| i["type"] != "anonymous_id"));
                    if known {
                        return refuse(
                            "token_required",
                            StatusCode::FORBIDDEN,
                            "this visitor is a known customer: read with a visitor token (POST /v1/tokens)".to_owned(),
                        );
                    }
                    Ok(id.label())
                }
                Lookup::Unknown => Ok(id.label()),
                Lookup::Unavailable(why) => {
                    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", why).retry_after(1))
                }
            }
        }
    }
}

/// A secret key with `scope` (no visitor token, no write key), or the refusal counted
/// under `route`.
fn secret(state: &ApiState, headers: &HeaderMap, addr: SocketAddr, scope: Scope) -> Result<(), ApiError> {
    let name = state.access.require_secret(headers, Some(addr.ip()), scope)?;
    tracing::debug!(key = name, scope = scope.as_str(), "authorised");
    Ok(())
}

#[derive(serde::Deserialize)]
struct PreviewParams {
    channel: Option<String>,
    /// Any identifier the customer endpoints take.
    customer: Option<String>,
    /// A JSON object: the request variables templates see as `vars`.
    vars: Option<String>,
}

/// `GET /v1/content/{id}?channel=&customer=&vars=`: the item rendered for a channel as
/// a decision would carry it, personalised for the customer when they consent.
async fn get_content_preview(
    State(state): State<ApiState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(content_id): Path<String>,
    params: Result<Params<PreviewParams>, QueryRejection>,
) -> Response {
    // Personalised for a customer, the rendering shows their profile: that needs
    // read:profiles too (the route checks read:content).
    let personalised = params.as_ref().is_ok_and(|Params(p)| p.customer.is_some());
    let allowed = if personalised { secret(&state, &headers, addr, Scope::ReadProfiles) } else { Ok(()) };
    if let Err(e) = allowed {
        return counted("/v1/content", e);
    }
    let response = match content_preview(&state, &content_id, params).await {
        Ok(preview) => (StatusCode::OK, Json(preview)).into_response(),
        Err(response) => response,
    };
    count("/v1/content", response.status());
    response
}

async fn content_preview(
    state: &ApiState,
    content_id: &str,
    params: Result<Params<PreviewParams>, QueryRejection>,
) -> Result<crate::query::ContentPreview, Response> {
    let bad = |code, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message).into_response();
    // The extractor's own rejection is plain text; answer in JSON like every error.
    let Params(params) = params.map_err(|e| bad("invalid_request", e.body_text()))?;
    let known = CHANNELS.join(", ");
    let channel = params
        .channel
        .ok_or_else(|| bad("invalid_request", format!("the `channel` query parameter is required ({known})")))?;
    if !CHANNELS.contains(&channel.as_str()) {
        return Err(bad("invalid_channel", format!("unknown channel {channel:?} (known: {known})")));
    }
    // Absent like a request without `variables`.
    let vars = match params.vars.as_deref() {
        None => Value::Null,
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(vars @ Value::Object(_)) => vars,
            Ok(_) => return Err(bad("invalid_request", "`vars` must be a JSON object".into())),
            Err(e) => return Err(bad("invalid_request", format!("`vars` is not valid JSON: {e}"))),
        },
    };
    let customer = params.customer.as_deref();
    state.query.content_preview(content_id, &channel, customer, &vars).await.map_err(|e| match e {
        PreviewError::UnknownCustomer => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no customer for identifier {:?}", customer.unwrap_or_default()),
        )
        .into_response(),
        PreviewError::UnknownContent => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no content item {content_id:?}")).into_response()
        }
        PreviewError::Render(e) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "content_error", e.to_string()).into_response()
        }
        PreviewError::Unavailable(why) => {
            unavailable(format!("content item {content_id:?} cannot be previewed right now: {why}"))
        }
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentUpdate {
    /// Purpose → granted; or one `purpose` with `granted`.
    #[serde(default)]
    purposes: std::collections::BTreeMap<String, bool>,
    #[serde(default)]
    purpose: Option<String>,
    #[serde(default)]
    granted: Option<bool>,
    #[serde(default)]
    source: Option<String>,
    /// RFC 3339; now when left out.
    #[serde(default)]
    timestamp: Option<String>,
}

/// `PUT /v1/consent/{identifier}`: consent changes, written to the `consent` topic
/// (so they reach every stage in order with the customer's events); `202` with the
/// changes accepted.
async fn put_consent(
    State(state): State<ApiState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(identifier): Path<String>,
    body: Bytes,
) -> Response {
    let result = match customer_access(&state, &headers, addr, Scope::WriteConsent, &identifier, false).await {
        Ok(identifier) => change_consent(&state, &identifier, &body).await,
        Err(e) => Err(e),
    };
    answer("/v1/consent", StatusCode::ACCEPTED, result)
}

async fn change_consent(state: &ApiState, identifier: &str, body: &[u8]) -> Result<Value, ApiError> {
    let bad = |code, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message);
    let update: ConsentUpdate = serde_json::from_slice(body).map_err(|e| {
        bad("invalid_request", format!("expected {{\"purposes\": {{purpose: true|false}}, \"source\"}}: {e}"))
    })?;
    let mut changes = update.purposes;
    match (update.purpose, update.granted) {
        (Some(p), Some(g)) => {
            changes.insert(p, g);
        }
        (None, None) => {}
        _ => return Err(bad("invalid_request", "`purpose` and `granted` go together".into())),
    }
    if changes.is_empty() {
        return Err(bad("invalid_request", "no consent change in the request".into()));
    }
    let purposes = &state.topology.consent.purposes;
    if let Some(unknown) = changes.keys().find(|p| !purposes.contains(p)) {
        return Err(bad("unknown_purpose", format!("{unknown:?} is not a declared purpose ({})", purposes.join(", "))));
    }
    let timestamp = match update.timestamp {
        Some(t) => t
            .parse::<jiff::Timestamp>()
            .map_err(|e| bad("invalid_request", format!("timestamp {t:?}: {e}")))?
            .to_string(),
        None => chorus_processors::time::rfc3339(now_ms()),
    };
    // Name the customer by an identifier the identity stage knows; a customer not seen
    // yet by the identifier given, when it is a valid one.
    let (kind, value) = match state.query.known_identifier(identifier).await {
        Lookup::Found(id) => id,
        Lookup::Unavailable(why) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", why));
        }
        Lookup::Unknown => identity::lookup_labels(&state.topology.identity, identifier)
            .first()
            .and_then(|l| l.split_once(':').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .ok_or_else(|| {
                bad("invalid_identifier", format!("{identifier:?} is not a known customer nor a valid identifier"))
            })?,
    };
    let key = format!("{kind}:{value}");
    let payloads: Vec<Vec<u8>> = changes
        .iter()
        .map(|(purpose, granted)| {
            let (customer_id, identifiers) = if kind == "customer_id" {
                (Some(value.clone()), Default::default())
            } else {
                (None, [(kind.clone(), value.clone())].into_iter().collect())
            };
            let change = ConsentChange {
                customer_id,
                identifiers,
                purpose: purpose.clone(),
                granted: *granted,
                timestamp: timestamp.clone(),
                timestamp_ms: 0,
                source: update.source.clone(),
            };
            serde_json::to_vec(&change).unwrap_or_default()
        })
        .collect();
    let records: Vec<(&str, &[u8], Option<i32>)> =
        payloads.iter().map(|p| (key.as_str(), p.as_slice(), None)).collect();
    produce(state, CONSENT, &records).await?;
    Ok(json!({"identifier": key, "changes": changes, "timestamp": timestamp}))
}

/// Every live instance, its address and the tasks it serves.
async fn get_instances(State(state): State<ApiState>) -> Response {
    // The members' cluster keys stay off this answer.
    let members: Vec<Value> = state
        .query
        .directory
        .members()
        .into_iter()
        .map(|m| json!({"instance_id": m.instance_id, "url": m.url, "tasks": m.tasks, "at": m.at}))
        .collect();
    answer("/v1/instances", StatusCode::OK, Ok(json!({"instances": members})))
}

#[derive(serde::Deserialize)]
struct KeyParam {
    key: Option<String>,
    #[serde(default)]
    consistency: Consistency,
}

/// Instance-to-instance read of one store value (live or committed, as asked): 200
/// with the value, 204 when the key is absent, 503 when the task is not open here (the
/// caller retries).
async fn get_store_value(
    State(state): State<ApiState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((processor, partition, store)): Path<(String, String, String)>,
    Params(param): Params<KeyParam>,
) -> Response {
    // Raw store values of any customer: only the members of this application.
    let presented = headers.get(crate::auth::CLUSTER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if let Err(e) = state.access.check_rate(Some(addr.ip())) {
        return counted("/internal/v1/stores", e);
    }
    if !state.access.is_cluster_key(presented) {
        let e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "members present the cluster secret");
        return counted("/internal/v1/stores", state.access.fail(Some(addr.ip()), "unknown_key", e));
    }
    let response = match (partition.parse::<u32>(), param.key) {
        (Err(_), _) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_partition", "partition must be a number").into_response()
        }
        (_, None) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "the `key` query parameter is required")
            .into_response(),
        (Ok(partition), Some(key)) => {
            match state.query.local.read(&processor, partition, &store, &key, param.consistency) {
                Ok(Some(value)) => ([(header::CONTENT_TYPE, "application/json")], value).into_response(),
                Ok(None) => StatusCode::NO_CONTENT.into_response(),
                Err(()) => unavailable(format!("{processor}[{partition}] is not served by this instance")),
            }
        }
    };
    count("/internal/v1/stores", response.status());
    response
}

/// A path or body identifier, normalised as the graph stores it.
fn parse_identifier(topology: &Topology, kind: &str, value: &str) -> Result<Identifier, ApiError> {
    Identifier::parse(&topology.identity, kind, value)
        .map_err(|refusal| ApiError::new(StatusCode::BAD_REQUEST, "invalid_identifier", refusal.explain(kind, value)))
}

async fn get_identity(
    State(state): State<ApiState>,
    Path((kind, value)): Path<(String, String)>,
    params: ReadQuery,
) -> Response {
    let query = match reader(&state, params) {
        Ok(q) => q,
        Err(e) => return counted("/v1/identity", e),
    };
    let id = match parse_identifier(&state.topology, &kind, &value) {
        Ok(id) => id,
        Err(e) => {
            let response = e.into_response();
            count("/v1/identity", response.status());
            return response;
        }
    };
    let lookup = query.identity(&id.label()).await;
    lookup_response("/v1/identity", "customer", &id.label(), lookup)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UnlinkRequest {
    #[serde(rename = "type")]
    kind: String,
    value: String,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/identity/unlink {"type", "value", "reason"}`: the identifier leaves its
/// customer, starts a new one that never merges back, and the split is emitted on
/// `identity.merges` (rule `unlink`).
async fn post_unlink(State(state): State<ApiState>, body: Bytes) -> Response {
    let result = unlink(&state, &body).await;
    answer("/v1/identity/unlink", StatusCode::ACCEPTED, result)
}

async fn unlink(state: &ApiState, body: &[u8]) -> Result<Value, ApiError> {
    let request: UnlinkRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("expected {{\"type\", \"value\"}}: {e}"))
    })?;
    let id = parse_identifier(&state.topology, &request.kind, &request.value)?;
    let current = match state.query.identity(&id.label()).await {
        Lookup::Found(v) => v,
        Lookup::Unknown => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{} is not linked to any customer", id.label()),
            ))
        }
        Lookup::Unavailable(why) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", why)),
    };
    let (key, payload) = identity::unlink_message(&id, now_ms());
    let topic = state.topology.physical_topic(IDENTITY_REPARTITION);
    let record = FutureRecord::to(&topic).key(&key).payload(&payload).timestamp(now_ms());
    state.producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            format!("could not request the unlink: {e}"),
        )
    })?;
    tracing::info!(identifier = %id.label(), reason = ?request.reason, "unlink requested");
    Ok(json!({"unlinking": id.label(), "from": current["canonical_id"]}))
}

/// `POST /v1/privacy/requests {"type", "identifier": {"type", "value"}, "changes",
/// "reason", "status_callback_url"}`: validated here, written as one record to
/// `privacy.requests` (or not at all), answered `202 {"request_id",
/// "expected_completion"}`.
async fn post_privacy_request(State(state): State<ApiState>, body: Bytes) -> Response {
    answer("/v1/privacy/requests", StatusCode::ACCEPTED, file_privacy_request(&state, &body, None).await)
}

/// `POST /v1/privacy/unsuppress {"identifier": {"type", "value"}, "reason"}`: an erased
/// identifier may come back (its subject asked to).
async fn post_unsuppress(State(state): State<ApiState>, body: Bytes) -> Response {
    let result = file_privacy_request(&state, &body, Some(RequestType::Unsuppress)).await;
    answer("/v1/privacy/unsuppress", StatusCode::ACCEPTED, result)
}

async fn file_privacy_request(state: &ApiState, body: &[u8], kind: Option<RequestType>) -> Result<Value, ApiError> {
    let mut json: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("the body is not valid JSON: {e}"))
    })?;
    if let (Some(kind), Value::Object(map)) = (kind, &mut json) {
        if let Some(given) = map.get("type") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("this route files unsuppress requests; it takes no type (got {given})"),
            )
            .on_field("type"));
        }
        map.insert("type".into(), Value::String(kind.as_str().into()));
    }
    if let Value::Object(map) = &json {
        for internal in ["request_id", "received_at"] {
            if map.contains_key(internal) {
                return Err(
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "is set by chorus").on_field(internal)
                );
            }
        }
    }
    let now = now_ms();
    let request = PrivacyRequest::parse(
        &json,
        &state.topology.identity,
        || uuid::Uuid::now_v7().to_string(),
        now,
        state.topology.limits.max_record_bytes,
    )
    .map_err(|e| {
        let status =
            if e.code == "invalid_changes" { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
        ApiError::new(status, e.code, e.message).on_field(e.field)
    })?;
    if let Some(url) = &request.status_callback_url {
        if !state.topology.privacy.callbacks.allows(url) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_callback_url",
                "its host is not in privacy.callbacks.hosts",
            )
            .on_field("status_callback_url"));
        }
    }
    let value = serde_json::to_vec(&privacy_record(&request)).unwrap_or_default();
    let key = request.identifier.owner_key().to_owned();
    produce(state, &state.topology.physical_topic(privacy::REQUESTS_TOPIC), &[(key.as_str(), &value, None)]).await?;
    tracing::info!(request_id = %request.request_id, kind = request.kind.as_str(), "privacy request filed");
    let expected = request.received_at.saturating_add(state.topology.privacy.expected_completion.ms());
    Ok(json!({
        "request_id": request.request_id,
        "type": request.kind.as_str(),
        "status": "pending",
        "expected_completion": chorus_processors::time::rfc3339(expected),
    }))
}

/// The record a validated request is filed as: the body with the id and time chorus gave it.
fn privacy_record(request: &PrivacyRequest) -> Value {
    let mut record = json!({
        "request_id": request.request_id,
        "type": request.kind.as_str(),
        "identifier": {"type": request.identifier.kind, "value": request.identifier.value},
        "received_at": request.received_at,
    });
    if let Some(changes) = &request.changes {
        record["changes"] = Value::Object(changes.clone());
    }
    if let Some(reason) = &request.reason {
        record["reason"] = Value::String(reason.clone());
    }
    if let Some(url) = &request.status_callback_url {
        record["status_callback_url"] = Value::String(url.clone());
    }
    record
}

/// A request id in a path, or its 400.
fn request_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id).map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_id", "a request id is a UUID").on_field("request_id")
    })
}

/// The status actor's record of a request; a request filed a moment ago that the
/// pipeline has not admitted yet is `pending`.
async fn privacy_state(state: &ApiState, id: &str) -> Result<Option<RequestState>, ApiError> {
    let uuid = request_id(id)?;
    match state.query.privacy_request(&uuid.to_string()).await {
        Lookup::Found(s) => Ok(Some(s)),
        Lookup::Unavailable(why) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", why)),
        Lookup::Unknown => {
            let minted = uuid.get_timestamp().map(|t| t.to_unix()).map(|(s, n)| s as i64 * 1000 + n as i64 / 1_000_000);
            if minted.is_some_and(|at| now_ms() - at < 60_000 && at <= now_ms() + 5_000) {
                return Ok(None);
            }
            Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_request", format!("no privacy request {uuid}"))
                .on_field("request_id"))
        }
    }
}

/// `GET /v1/privacy/requests/{id}`: status (`pending`, `in_progress`, `completed`,
/// `failed` with the part that failed), per stage and store, and the receipt. It holds
/// no personal data.
async fn get_privacy_request(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let response = match privacy_state(&state, &id).await {
        Ok(Some(s)) => (StatusCode::OK, Json(s.receipt())).into_response(),
        Ok(None) => (StatusCode::OK, Json(json!({"request_id": id, "status": "pending"}))).into_response(),
        Err(e) => e.into_response(),
    };
    count("/v1/privacy/requests/{id}", response.status());
    response
}

/// `GET /v1/privacy/requests/{id}/export`: the access export. It is personal data, so
/// it takes `Authorization: Bearer <privacy.api_key>`.
async fn get_privacy_export(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    answer("/v1/privacy/requests/{id}/export", StatusCode::OK, privacy_export(&state, &id).await)
}

/// `GET /v1/privacy/requests/{id}/export.zip`: the same export as `export.json` with a
/// CSV file per kind of record (portability).
async fn get_privacy_export_zip(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let zipped = privacy_export(&state, &id).await.and_then(|export| {
        crate::export::zip(&export)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "export_failed", e.to_string()))
    });
    let response = match zipped {
        Ok(bytes) => {
            let disposition = format!("attachment; filename=\"chorus-export-{id}.zip\"");
            ([(header::CONTENT_TYPE, "application/zip".to_owned()), (header::CONTENT_DISPOSITION, disposition)], bytes)
                .into_response()
        }
        Err(e) => e.into_response(),
    };
    count("/v1/privacy/requests/{id}/export.zip", response.status());
    response
}

async fn privacy_export(state: &ApiState, id: &str) -> Result<Value, ApiError> {
    let Some(request) = privacy_state(state, id).await? else {
        return Err(ApiError::new(StatusCode::CONFLICT, "not_ready", "the request is still pending"));
    };
    if !request.kind().is_some_and(RequestType::exports) {
        return Err(ApiError::new(StatusCode::CONFLICT, "no_export", "only access and portability requests export")
            .on_field("request_id"));
    }
    if request.status != status::Status::Completed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_ready",
            format!("the request is {}; its export is ready when it is completed", request.status.as_str()),
        ));
    }
    if request.note.as_deref() == Some(status::SUBJECT_ERASED) {
        return Err(ApiError::new(
            StatusCode::GONE,
            "subject_erased",
            "the subject was erased since; so was this export",
        ));
    }
    // Filed over HTTP or on the topic, `received_at` is wall-clock time.
    let received = request.admission.as_ref().map_or(0, |a| a.received_at);
    if now_ms() > received.saturating_add(state.topology.privacy.export_ttl.ms()) {
        return Err(ApiError::new(
            StatusCode::GONE,
            "export_expired",
            "exports are kept privacy.export_ttl after the request was filed",
        ));
    }
    state
        .query
        .privacy_export(&request, read_clock(state))
        .await
        .map_err(|why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_available", why))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    /// `type:value` (`customer_id:cust_123`), or `{"type", "value"}`.
    identifier: Value,
    /// Default: read:context and read:recommendations.
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// Default 15 minutes; at most `access.token_max_ttl`.
    #[serde(default)]
    ttl: Option<String>,
}

/// How long a visitor token lives unless asked otherwise.
const DEFAULT_TOKEN_TTL_MS: i64 = 15 * 60_000;

/// `POST /v1/tokens` (a secret key with admin:tokens): a short-lived visitor token for
/// one customer, which the site's backend hands to the browser so that it can read that
/// customer's context and recommendations, and nobody else's.
async fn post_token(State(state): State<ApiState>, body: Bytes) -> Response {
    answer("/v1/tokens", StatusCode::OK, mint_token(&state, &body))
}

fn mint_token(state: &ApiState, body: &[u8]) -> Result<Value, ApiError> {
    let bad =
        |code, field: &str, message: String| ApiError::new(StatusCode::BAD_REQUEST, code, message).on_field(field);
    let request: TokenRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected {{\"identifier\", \"scopes\", \"ttl\"}}: {e}"),
        )
    })?;
    let (kind, value) = match &request.identifier {
        Value::String(label) => label
            .split_once(':')
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .ok_or_else(|| bad("invalid_identifier", "identifier", format!("{label:?} is not `type:value`")))?,
        Value::Object(o) => match (o.get("type").and_then(Value::as_str), o.get("value").and_then(Value::as_str)) {
            (Some(k), Some(v)) => (k.to_owned(), v.to_owned()),
            _ => return Err(bad("invalid_identifier", "identifier", "expected {\"type\", \"value\"}".into())),
        },
        _ => {
            return Err(bad(
                "invalid_identifier",
                "identifier",
                "expected `type:value` or {\"type\", \"value\"}".into(),
            ))
        }
    };
    let id = parse_identifier(&state.topology, &kind, &value).map_err(|e| e.on_field("identifier"))?;
    let names = request.scopes.unwrap_or_else(|| vec!["read:context".into(), "read:recommendations".into()]);
    let mut scopes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match Scope::parse(name).filter(|s| Scope::VISITOR.contains(s)) {
            Some(scope) => scopes.push(scope),
            None => {
                let allowed: Vec<&str> = Scope::VISITOR.iter().map(|s| s.as_str()).collect();
                return Err(bad(
                    "invalid_scope",
                    &format!("scopes[{i}]"),
                    format!("{name:?} cannot be given to a visitor (allowed: {})", allowed.join(", ")),
                ));
            }
        }
    }
    let ttl = match request.ttl.as_deref() {
        None => DEFAULT_TOKEN_TTL_MS.min(state.access.token_max_ttl_ms),
        Some(text) => {
            chorus_processors::topology::Duration::parse(text).map_err(|e| bad("invalid_request", "ttl", e))?.ms()
        }
    };
    if ttl <= 0 || ttl > state.access.token_max_ttl_ms {
        return Err(bad(
            "invalid_request",
            "ttl",
            format!("a visitor token lives at most access.token_max_ttl ({} s)", state.access.token_max_ttl_ms / 1000),
        ));
    }
    let (token, claims) = state.access.mint_token(&id.label(), &scopes, ttl);
    Ok(crate::auth::token_answer(&token, &claims))
}

/// Behind trusted proxies, the client's address from `X-Forwarded-For` replaces the
/// peer's in the request's `ConnectInfo`, so every handler (rate limits, `context.ip`)
/// sees the client and none has to know about proxies.
async fn client_address(
    State(state): State<ApiState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        let client = state.access.client_ip(peer.ip(), request.headers());
        if client != peer.ip() {
            request.extensions_mut().insert(ConnectInfo(SocketAddr::new(client, peer.port())));
        }
    }
    next.run(request).await
}

/// CORS for browsers: a preflight from an origin some source allows is answered (the
/// Segment routes then check the origin against the key's own source); answers to such
/// an origin carry `Access-Control-Allow-Origin`. Other origins get no CORS headers, so
/// their pages cannot read anything.
async fn cors(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed = origin.as_ref().and_then(|o| o.to_str().ok()).is_some_and(|o| state.access.any_source_allows(o));
    let preflight = request.method() == axum::http::Method::OPTIONS
        && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this origin is not allowed by any source",
            )
            .into_response();
        }
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET, POST, PUT, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::HeaderValue::from_static("authorization, content-type, content-encoding, x-retry-count"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
        r
    } else {
        next.run(request).await
    };
    if let (true, Some(origin)) = (allowed, origin) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, header::HeaderValue::from_static("true"));
        h.append(header::VARY, header::HeaderValue::from_static("Origin"));
    }
    response
}

/// `/healthz`, `/readyz` and `/metrics` are open unless `access.open` leaves them out;
/// then they take a secret key with read:metrics (Prometheus sends it as a bearer token).
fn open_or_keyed(
    state: &ApiState,
    endpoint: &'static str,
    route: axum::routing::MethodRouter<ApiState>,
) -> axum::routing::MethodRouter<ApiState> {
    if state.access.is_open(endpoint) {
        route
    } else {
        let label = match endpoint {
            "healthz" => "/healthz",
            "readyz" => "/readyz",
            _ => "/metrics",
        };
        keyed(state, Scope::ReadMetrics, label, route)
    }
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn get_metrics(State(state): State<ApiState>) -> Response {
    let sizes = state.query.local.store_sizes(&state.topology);
    // Only partitions open right now: a partition handed to another member disappears.
    metrics().store_entries.reset();
    metrics().store_bytes.reset();
    for (processor, store, partition, n, bytes) in sizes {
        let labels = [processor.as_str(), store.as_str(), &partition.to_string()];
        metrics().store_entries.with_label_values(&labels).set(n as i64);
        metrics().store_bytes.with_label_values(&labels).set(bytes as i64);
    }
    metrics().cache_bytes.reset();
    for (processor, partition, bytes) in state.query.local.cache_sizes() {
        metrics().cache_bytes.with_label_values(&[processor.as_str(), &partition.to_string()]).set(bytes as i64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render()).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if let Some(why) = state.query.local.failure() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "task_failed", why).into_response();
    }
    if state.query.local.open_tasks() > 0 {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "no partitions assigned yet").into_response()
    }
}

pub async fn serve(
    addr: &str,
    state: ApiState,
    shutdown: Arc<tokio::sync::Notify>,
) -> Result<(tokio::task::JoinHandle<()>, String)> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr()?.to_string();
    let app = router(state);
    let handle = tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.notified().await }).await;
    });
    Ok((handle, bound))
}
