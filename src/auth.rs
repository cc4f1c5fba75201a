//! Access control for the HTTP API: write keys (per source, for sending events), secret
//! API keys with scopes (backends), visitor tokens (short-lived, HMAC-signed, one
//! customer: what a browser may read), and the cluster secret between members.
//!
//! Keys are compared in constant time (as SHA-256 digests, so their lengths do not
//! show either) and never logged: logs and metrics name a key by its configured
//! name. Every refusal is counted (`chorus_auth_failures_total{reason}`), and an
//! address that keeps failing is refused with 429 until its window ends, so keys
//! cannot be guessed at speed.

use crate::http::ApiError;
use crate::kafka::{expand_env, now_ms};
use anyhow::{Context as _, Result};
use axum::http::{header, HeaderMap, StatusCode};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use chorus_processors::access::{AccessConfig, Scope};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use subtle::ConstantTimeEq as _;

/// The header members present the cluster secret in.
pub const CLUSTER_HEADER: &str = "x-chorus-cluster-key";

/// What visitor tokens start with (and how they are told from secret keys).
const TOKEN_PREFIX: &str = "vt1.";

/// A source of events and its write keys.
pub struct Source {
    pub name: String,
    pub channel: String,
    origins: Vec<String>,
    keys: Vec<[u8; 32]>,
}

impl Source {
    /// Whether a browser at `origin` may send with this source's keys.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins.iter().any(|pattern| origin_matches(pattern, origin))
    }
}

struct ApiKey {
    name: String,
    digest: [u8; 32],
    scopes: BTreeSet<Scope>,
}

/// Who is calling, once their credential checked out.
pub enum Caller<'a> {
    /// A secret API key (its configured name).
    Secret(&'a str),
    /// A visitor token: the identifier (`type:value`) it was minted for.
    Visitor(String),
    /// A write key of this source.
    WriteKey(&'a Source),
}

/// A visitor token's claims.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VisitorClaims {
    /// The customer's identifier, `type:value`.
    pub sub: String,
    pub scopes: Vec<String>,
    /// Expiry, ms since the epoch.
    pub exp: i64,
    pub iat: i64,
}

pub struct Access {
    sources: Vec<Source>,
    api_keys: Vec<ApiKey>,
    token_secret: Vec<u8>,
    pub token_max_ttl_ms: i64,
    cluster_secret: [u8; 32],
    /// The cluster secret this member presents to others (configured, or its own).
    pub cluster_key: String,
    /// Whether `cluster_key` is shared by every member (configured) or this member's own.
    pub cluster_key_shared: bool,
    open: Vec<String>,
    failures: Mutex<HashMap<IpAddr, Window>>,
    failure_limit: u32,
    failure_window_ms: i64,
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Development credentials made for this data directory (`write_key`, `secret_key`):
    /// printed by `chorus up` and `chorus run`, never logged.
    pub development: Vec<(&'static str, String)>,
}

#[derive(Clone, Copy)]
struct Window {
    start: i64,
    failures: u32,
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// A random secret of 32 hex digits per uuid (two: 244 random bits).
fn random_secret(prefix: &str) -> String {
    format!("{prefix}{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Development credentials, made once per data directory and kept there, so a page
/// or script configured with them keeps working across restarts.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct DevelopmentKeys {
    write_key: String,
    secret_key: String,
    token_secret: String,
}

impl DevelopmentKeys {
    const FILE: &'static str = "development-keys.json";

    fn load_or_create(data_dir: &Path) -> Result<DevelopmentKeys> {
        let path = data_dir.join(Self::FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(keys) = serde_json::from_str::<DevelopmentKeys>(&text) {
                return Ok(keys);
            }
        }
        let keys = DevelopmentKeys {
            write_key: random_secret("wk_dev_")[..31].to_owned(),
            secret_key: random_secret("sk_dev_"),
            token_secret: random_secret(""),
        };
        std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        std::fs::write(&path, serde_json::to_vec_pretty(&keys)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(keys)
    }
}

impl Access {
    /// The topology's credentials with `${VAR}` expanded; development ones (kept in
    /// `data_dir`) where the topology has none.
    /// `privacy_key` (`privacy.api_key`, the earlier name of an admin:privacy key) is
    /// one more secret key, with that scope only.
    pub fn from_config(config: &AccessConfig, privacy_key: &str, data_dir: &Path) -> Result<Access> {
        let mut development = Vec::new();
        let needs_dev = config.sources.is_empty() || config.api_keys.is_empty() || config.token_secret.is_empty();
        let dev = if needs_dev { DevelopmentKeys::load_or_create(data_dir)? } else { DevelopmentKeys::default() };
        let mut sources = Vec::new();
        for (i, s) in config.sources.iter().enumerate() {
            let keys = s
                .write_keys
                .iter()
                .enumerate()
                .map(|(j, k)| expand_env(k).with_context(|| format!("access.sources[{i}].write_keys[{j}]")))
                .collect::<Result<Vec<_>>>()?;
            sources.push(Source {
                name: s.name.clone(),
                channel: s.channel.clone(),
                origins: s.allowed_origins.clone(),
                keys: keys.iter().filter(|k| !k.is_empty()).map(|k| digest(k)).collect(),
            });
        }
        if sources.is_empty() {
            development.push(("write_key", dev.write_key.clone()));
            sources.push(Source {
                name: "development".into(),
                channel: "web".into(),
                origins: vec!["*".into()],
                keys: vec![digest(&dev.write_key)],
            });
        }
        let mut api_keys = Vec::new();
        for (i, k) in config.api_keys.iter().enumerate() {
            let key = expand_env(&k.key).with_context(|| format!("access.api_keys[{i}].key"))?;
            if key.len() < chorus_processors::access::MIN_SECRET_LEN {
                anyhow::bail!(
                    "access.api_keys[{i}].key: must be at least {} characters",
                    chorus_processors::access::MIN_SECRET_LEN
                );
            }
            let scopes = k.scopes.iter().filter_map(|s| Scope::expand(s)).flatten().collect();
            api_keys.push(ApiKey { name: k.name.clone(), digest: digest(&key), scopes });
        }
        if api_keys.is_empty() {
            development.push(("secret_key", dev.secret_key.clone()));
            api_keys.push(ApiKey {
                name: "development".into(),
                digest: digest(&dev.secret_key),
                scopes: Scope::ALL.into_iter().collect(),
            });
        }
        let privacy_key = expand_env(privacy_key).context("privacy.api_key")?;
        if !privacy_key.is_empty() {
            api_keys.push(ApiKey {
                name: "privacy.api_key".into(),
                digest: digest(&privacy_key),
                scopes: [Scope::AdminPrivacy].into_iter().collect(),
            });
        }
        let token_secret = match expand_env(&config.token_secret).context("access.token_secret")? {
            s if s.is_empty() => dev.token_secret.clone(),
            s => s,
        };
        let (cluster_key, cluster_key_shared) =
            match expand_env(&config.cluster_secret).context("access.cluster_secret")? {
                s if s.is_empty() => (random_secret("ck_"), false),
                s => (s, true),
            };
        Ok(Access {
            sources,
            api_keys,
            token_secret: token_secret.into_bytes(),
            token_max_ttl_ms: config.token_max_ttl.ms(),
            cluster_secret: digest(&cluster_key),
            cluster_key,
            cluster_key_shared,
            open: config.open.clone(),
            failures: Mutex::default(),
            failure_limit: config.failed_auth_limit,
            failure_window_ms: config.failed_auth_window.ms(),
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|p| chorus_processors::access::parse_network(p))
                .collect(),
            development,
        })
    }

    /// The client's address: the peer's, or behind trusted proxies the last address of
    /// `X-Forwarded-For` that is not a proxy (the ones before it could be forged).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        forwarded.into_iter().rev().find(|ip| !trusted(ip)).unwrap_or(peer)
    }

    pub fn is_open(&self, endpoint: &str) -> bool {
        self.open.iter().any(|e| e == endpoint)
    }

    /// The source one of whose write keys this is. Every key is compared, so the time
    /// taken does not tell which one (or whether any) matched.
    pub fn source_of(&self, write_key: &str) -> Option<&Source> {
        let given = digest(write_key);
        let mut found = None;
        for source in &self.sources {
            for key in &source.keys {
                if bool::from(key.ct_eq(&given)) && found.is_none() {
                    found = Some(source);
                }
            }
        }
        found
    }

    fn api_key(&self, secret: &str) -> Option<&ApiKey> {
        let given = digest(secret);
        let mut found = None;
        for key in &self.api_keys {
            if bool::from(key.digest.ct_eq(&given)) && found.is_none() {
                found = Some(key);
            }
        }
        found
    }

    /// Whether a browser at `origin` may call at all (any source allows it).
    pub fn any_source_allows(&self, origin: &str) -> bool {
        self.sources.iter().any(|s| s.allows_origin(origin))
    }

    /// Whether `presented` is the cluster secret of this member.
    pub fn is_cluster_key(&self, presented: &str) -> bool {
        bool::from(digest(presented).ct_eq(&self.cluster_secret))
    }

    /// Refuse an address that failed too often in its window (429 with Retry-After).
    pub fn check_rate(&self, ip: Option<IpAddr>) -> Result<(), ApiError> {
        let Some(ip) = ip else { return Ok(()) };
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = failures.get(&ip) {
            let left = w.start + self.failure_window_ms - now_ms();
            if w.failures >= self.failure_limit && left > 0 {
                crate::metrics::metrics().auth_failures.with_label_values(&["rate_limited"]).inc();
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_failures",
                    "too many failed authentications from this address; try again later",
                )
                .retry_after((left / 1000 + 1).max(1)));
            }
        }
        Ok(())
    }

    /// Count a refusal against the address, and in metrics; `error` is the answer.
    pub fn fail(&self, ip: Option<IpAddr>, reason: &'static str, error: ApiError) -> ApiError {
        self.record_failure(ip, reason);
        error
    }

    /// Count a refusal against the address, and in metrics.
    pub fn record_failure(&self, ip: Option<IpAddr>, reason: &'static str) {
        crate::metrics::metrics().auth_failures.with_label_values(&[reason]).inc();
        if let Some(ip) = ip {
            let now = now_ms();
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            if failures.len() > 100_000 {
                let window = self.failure_window_ms;
                failures.retain(|_, w| w.start + window > now);
            }
            let w = failures.entry(ip).or_insert(Window { start: now, failures: 0 });
            if w.start + self.failure_window_ms <= now {
                *w = Window { start: now, failures: 0 };
            }
            w.failures = w.failures.saturating_add(1);
        }
    }

    /// Who the request comes from, for an endpoint that needs `scope`. A write key is
    /// returned as such: only the handlers that take one (events, anonymous reads)
    /// accept it; [`Access::require`] refuses it.
    pub fn caller(&self, headers: &HeaderMap, ip: Option<IpAddr>, scope: Scope) -> Result<Caller<'_>, ApiError> {
        self.check_rate(ip)?;
        let Some(authorization) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(self.fail(
                ip,
                "missing",
                unauthorized(format!("this endpoint needs a key with {}", scope.as_str())),
            ));
        };
        if let Some(token) = bearer(authorization) {
            if token.starts_with(TOKEN_PREFIX) {
                let claims = match self.verify_token(token) {
                    Ok(c) => c,
                    Err(reason) => {
                        let message = match reason {
                            "expired_token" => "the visitor token has expired",
                            _ => "the visitor token is not valid",
                        };
                        return Err(self.fail(ip, reason, unauthorized(message.to_owned())));
                    }
                };
                if !claims.scopes.iter().any(|s| s == scope.as_str()) {
                    return Err(self.fail(ip, "insufficient_scope", insufficient(scope)));
                }
                return Ok(Caller::Visitor(claims.sub));
            }
            let Some(key) = self.api_key(token) else {
                return Err(self.fail(ip, "unknown_key", unauthorized("the key is not valid".to_owned())));
            };
            if !key.scopes.contains(&scope) {
                return Err(self.fail(ip, "insufficient_scope", insufficient(scope)));
            }
            return Ok(Caller::Secret(&key.name));
        }
        if let Some(write_key) = basic_user(authorization) {
            return match self.source_of(&write_key) {
                Some(source) => Ok(Caller::WriteKey(source)),
                None => Err(self.fail(ip, "unknown_key", unauthorized("the write key is not valid".to_owned()))),
            };
        }
        Err(self.fail(ip, "missing", unauthorized("expected Authorization: Bearer <key>".to_owned())))
    }

    /// A secret key (or visitor token) with `scope`; write keys are refused (403).
    pub fn require(&self, headers: &HeaderMap, ip: Option<IpAddr>, scope: Scope) -> Result<Caller<'_>, ApiError> {
        match self.caller(headers, ip, scope)? {
            Caller::WriteKey(_) => Err(self.fail(
                ip,
                "insufficient_scope",
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    format!("a write key only sends events; this endpoint needs a secret key with {}", scope.as_str()),
                ),
            )),
            caller => Ok(caller),
        }
    }

    /// A secret key with `scope`; visitor tokens and write keys are refused.
    pub fn require_secret(&self, headers: &HeaderMap, ip: Option<IpAddr>, scope: Scope) -> Result<&str, ApiError> {
        match self.require(headers, ip, scope)? {
            Caller::Secret(name) => Ok(name),
            _ => Err(self.fail(
                ip,
                "insufficient_scope",
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    format!("this endpoint needs a secret key with {}, not a visitor token", scope.as_str()),
                ),
            )),
        }
    }

    /// A visitor token for `subject` (`type:value`) with `scopes`, valid `ttl_ms`.
    pub fn mint_token(&self, subject: &str, scopes: &[Scope], ttl_ms: i64) -> (String, VisitorClaims) {
        let now = now_ms();
        let claims = VisitorClaims {
            sub: subject.to_owned(),
            scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            exp: now + ttl_ms,
            iat: now,
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = URL_SAFE_NO_PAD.encode(self.sign(&body));
        (format!("{TOKEN_PREFIX}{body}.{signature}"), claims)
    }

    fn sign(&self, body: &str) -> Vec<u8> {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.token_secret) {
            Ok(mac) => mac,
            Err(_) => return Vec::new(),
        };
        mac.update(TOKEN_PREFIX.as_bytes());
        mac.update(body.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The claims of a token this application signed and that has not expired; the
    /// refusal reason otherwise.
    pub fn verify_token(&self, token: &str) -> Result<VisitorClaims, &'static str> {
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or("bad_token")?;
        let (body, signature) = rest.split_once('.').ok_or("bad_token")?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "bad_token")?;
        if !bool::from(self.sign(body).ct_eq(&signature)) {
            return Err("bad_token");
        }
        let claims: VisitorClaims =
            URL_SAFE_NO_PAD.decode(body).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or("bad_token")?;
        if claims.exp <= now_ms() {
            return Err("expired_token");
        }
        Ok(claims)
    }

    /// What `chorus up` and `chorus run` print about development credentials.
    pub fn development_lines(&self) -> Vec<String> {
        self.development
            .iter()
            .map(|(name, key)| {
                let what = match *name {
                    "write_key" => "development write key: set access.sources in topology.yaml for production",
                    _ => "development secret key, every scope: set access.api_keys in topology.yaml for production",
                };
                format!("{name}: {key}  # {what}")
            })
            .collect()
    }
}

/// `Bearer <token>` (the scheme is case-insensitive).
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The user of `Basic base64(user:password)`; Segment's write key is the user, with or
/// without the colon.
pub fn basic_user(authorization: &str) -> Option<String> {
    let (scheme, rest) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
    (!user.is_empty()).then(|| user.to_owned())
}

fn unauthorized(message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

fn insufficient(scope: Scope) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "insufficient_scope", format!("the key lacks the scope {}", scope.as_str()))
}

/// `https://shop.example.com` exactly, `http://localhost:*` any port, `*` anything.
fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(":*") {
        Some(host) => {
            origin == host
                || origin.strip_prefix(host).is_some_and(|port| {
                    port.strip_prefix(':').is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                })
        }
        None => pattern.eq_ignore_ascii_case(origin),
    }
}

/// The JSON answer of `POST /v1/tokens`.
pub fn token_answer(token: &str, claims: &VisitorClaims) -> Value {
    json!({
        "token": token,
        "identifier": claims.sub,
        "scopes": claims.scopes,
        "expires_at": chorus_processors::time::rfc3339(claims.exp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_processors::access::{ApiKeyConfig, SourceConfig};

    fn access() -> Access {
        let dir = tempfile::tempdir().unwrap();
        let config = AccessConfig {
            sources: vec![SourceConfig {
                name: "web".into(),
                write_keys: vec!["wk_old_key_1".into(), "wk_new_key_2".into()],
                channel: "web".into(),
                allowed_origins: vec!["https://shop.example.com".into(), "http://localhost:*".into()],
            }],
            api_keys: vec![ApiKeyConfig {
                name: "reader".into(),
                key: "sk_reader_0123456789abcdefghij".into(),
                scopes: vec!["read:*".into()],
            }],
            token_secret: "token-secret-0123456789abcdef".into(),
            failed_auth_limit: 3,
            ..AccessConfig::default()
        };
        Access::from_config(&config, "", dir.path()).unwrap()
    }

    fn with(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        h
    }

    #[test]
    fn both_rotated_write_keys_name_the_source() {
        let a = access();
        assert_eq!(a.source_of("wk_old_key_1").unwrap().name, "web");
        assert_eq!(a.source_of("wk_new_key_2").unwrap().name, "web");
        assert!(a.source_of("wk_other").is_none());
        assert!(a.development.is_empty());
    }

    #[test]
    fn basic_auth_takes_the_key_with_or_without_the_colon() {
        assert_eq!(basic_user(&format!("Basic {}", STANDARD.encode("wk:"))).as_deref(), Some("wk"));
        assert_eq!(basic_user(&format!("basic {}", STANDARD.encode("wk"))).as_deref(), Some("wk"));
        assert_eq!(basic_user("Basic !!!"), None);
        assert_eq!(basic_user("Bearer abc"), None);
    }

    #[test]
    fn scopes_are_checked_and_write_keys_only_send() {
        let a = access();
        let secret = with("Bearer sk_reader_0123456789abcdefghij");
        assert!(matches!(a.require(&secret, None, Scope::ReadProfiles), Ok(Caller::Secret("reader"))));
        let e = a.require(&secret, None, Scope::AdminPrivacy).err().unwrap();
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        let write = with(&format!("Basic {}", STANDARD.encode("wk_new_key_2:")));
        assert!(matches!(a.caller(&write, None, Scope::WriteEvents), Ok(Caller::WriteKey(_))));
        assert_eq!(a.require(&write, None, Scope::ReadProfiles).err().unwrap().status(), StatusCode::FORBIDDEN);
        assert_eq!(
            a.require(&HeaderMap::new(), None, Scope::ReadProfiles).err().unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            a.require(&with("Bearer nope"), None, Scope::ReadProfiles).err().unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn visitor_tokens_verify_expire_and_cannot_be_forged() {
        let a = access();
        let (token, claims) = a.mint_token("customer_id:u1", &[Scope::ReadContext], 60_000);
        assert_eq!(a.verify_token(&token).unwrap(), claims);
        assert!(
            matches!(a.require(&with(&format!("Bearer {token}")), None, Scope::ReadContext), Ok(Caller::Visitor(s)) if s == "customer_id:u1")
        );
        assert_eq!(
            a.require(&with(&format!("Bearer {token}")), None, Scope::ReadProfiles).err().unwrap().status(),
            StatusCode::FORBIDDEN
        );
        let (expired, _) = a.mint_token("customer_id:u1", &[Scope::ReadContext], -1);
        assert_eq!(a.verify_token(&expired), Err("expired_token"));
        // Another subject pasted into a valid token's body breaks its signature.
        let (_, other) = a.mint_token("customer_id:u2", &[Scope::ReadContext], 60_000);
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
        let signature = token.rsplit_once('.').unwrap().1;
        assert_eq!(a.verify_token(&format!("{TOKEN_PREFIX}{forged_body}.{signature}")), Err("bad_token"));
        // A token of another application (another secret) is refused.
        assert_eq!(access_with_secret("another-secret-0123456789abcdef").verify_token(&token), Err("bad_token"));
    }

    fn access_with_secret(secret: &str) -> Access {
        let dir = tempfile::tempdir().unwrap();
        let config = AccessConfig { token_secret: secret.into(), ..AccessConfig::default() };
        Access::from_config(&config, "", dir.path()).unwrap()
    }

    #[test]
    fn repeated_failures_from_one_address_are_rate_limited() {
        let a = access();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(
                a.require(&with("Bearer wrong"), Some(ip), Scope::ReadContext).err().unwrap().status(),
                StatusCode::UNAUTHORIZED
            );
        }
        let right = with("Bearer sk_reader_0123456789abcdefghij");
        assert_eq!(
            a.require(&right, Some(ip), Scope::ReadContext).err().unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert!(a.require(&right, Some(other), Scope::ReadContext).is_ok());
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let dir = tempfile::tempdir().unwrap();
        let config = AccessConfig { trusted_proxies: vec!["10.0.0.0/8".into()], ..AccessConfig::default() };
        let a = Access::from_config(&config, "", dir.path()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.1, 203.0.113.5, 10.1.1.1".parse().unwrap());
        let proxy: IpAddr = "10.2.3.4".parse().unwrap();
        let stranger: IpAddr = "192.0.2.9".parse().unwrap();
        // The last untrusted hop: what a client prepends itself cannot be told from a forgery.
        assert_eq!(a.client_ip(proxy, &headers), "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(a.client_ip(stranger, &headers), stranger, "an untrusted peer's header is ignored");
        assert_eq!(a.client_ip(proxy, &HeaderMap::new()), proxy);
    }

    #[test]
    fn origins_match_exactly_by_port_pattern_or_any() {
        let a = access();
        let web = a.source_of("wk_old_key_1").unwrap();
        assert!(web.allows_origin("https://shop.example.com"));
        assert!(!web.allows_origin("https://shop.example.com.evil.test"));
        assert!(web.allows_origin("http://localhost:5173"));
        assert!(!web.allows_origin("http://localhost:5173.evil.test"));
        assert!(!web.allows_origin("http://localhostile:80"));
        assert!(origin_matches("*", "https://anything.test"));
    }

    #[test]
    fn development_keys_are_made_once_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = Access::from_config(&AccessConfig::default(), "", dir.path()).unwrap();
        let again = Access::from_config(&AccessConfig::default(), "", dir.path()).unwrap();
        assert_eq!(first.development, again.development);
        let (_, write_key) = &first.development[0];
        assert!(first.source_of(write_key).is_some());
        let lines = first.development_lines();
        assert!(lines[0].starts_with("write_key: wk_dev_") && lines[1].starts_with("secret_key: sk_dev_"));
        assert!(lines.iter().all(|l| l.contains("development")));
    }
}
