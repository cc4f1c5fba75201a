//! Who may write events and read customers: the `access:` section of topology.yaml.
//!
//! Three kinds of credential, as Segment and Braze users know them:
//! - **write keys**, one or more per *source* (a website, an app, a backend), public
//!   enough to sit in a browser: they only send events (the Segment-compatible routes);
//! - **secret API keys** with scopes, bearer tokens for backends: reads, consent,
//!   identity and privacy operations, visitor-token minting;
//! - **visitor tokens**, minted by a site's backend with a secret key, short-lived and
//!   HMAC-signed, naming one customer: what a browser shows its own visitor.
//!
//! The checks themselves live in the binary (`src/auth.rs`); this file only holds the
//! typed configuration and its validation, so `chorus validate` reports every mistake
//! with its YAML path.

use crate::topology::{config_error, ConfigError, Duration};
use serde::Deserialize;

/// What a secret key (or a visitor token) may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    ReadProfiles,
    ReadContext,
    ReadRecommendations,
    ReadConsent,
    ReadIdentity,
    ReadContent,
    ReadInstances,
    ReadMetrics,
    WriteEvents,
    WriteConsent,
    AdminIdentity,
    AdminPrivacy,
    AdminTokens,
}

impl Scope {
    pub const ALL: [Scope; 13] = [
        Scope::ReadProfiles,
        Scope::ReadContext,
        Scope::ReadRecommendations,
        Scope::ReadConsent,
        Scope::ReadIdentity,
        Scope::ReadContent,
        Scope::ReadInstances,
        Scope::ReadMetrics,
        Scope::WriteEvents,
        Scope::WriteConsent,
        Scope::AdminIdentity,
        Scope::AdminPrivacy,
        Scope::AdminTokens,
    ];

    /// What a visitor token may carry: its holder's own data, nothing administrative.
    pub const VISITOR: [Scope; 5] =
        [Scope::ReadProfiles, Scope::ReadContext, Scope::ReadRecommendations, Scope::ReadConsent, Scope::WriteConsent];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ReadProfiles => "read:profiles",
            Scope::ReadContext => "read:context",
            Scope::ReadRecommendations => "read:recommendations",
            Scope::ReadConsent => "read:consent",
            Scope::ReadIdentity => "read:identity",
            Scope::ReadContent => "read:content",
            Scope::ReadInstances => "read:instances",
            Scope::ReadMetrics => "read:metrics",
            Scope::WriteEvents => "write:events",
            Scope::WriteConsent => "write:consent",
            Scope::AdminIdentity => "admin:identity",
            Scope::AdminPrivacy => "admin:privacy",
            Scope::AdminTokens => "admin:tokens",
        }
    }

    pub fn parse(text: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// `read:*`-style and `*` patterns expand to every scope they cover.
    pub fn expand(pattern: &str) -> Option<Vec<Scope>> {
        if pattern == "*" {
            return Some(Scope::ALL.to_vec());
        }
        if let Some(prefix) = pattern.strip_suffix(":*") {
            let all: Vec<Scope> =
                Scope::ALL.into_iter().filter(|s| s.as_str().split(':').next() == Some(prefix)).collect();
            return (!all.is_empty()).then_some(all);
        }
        Scope::parse(pattern).map(|s| vec![s])
    }
}

/// The `access:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Event sources, each with its write keys. Empty: `chorus up` and `chorus run`
    /// make a development source and print its key.
    pub sources: Vec<SourceConfig>,
    /// Secret API keys. Empty: a development key with every scope, printed at start.
    pub api_keys: Vec<ApiKeyConfig>,
    /// HMAC-SHA256 key of visitor tokens (`${VAR}` from the environment). Empty: a
    /// development secret kept in the data directory.
    pub token_secret: String,
    /// The longest life a visitor token may be given.
    pub token_max_ttl: Duration,
    /// Shared by the members of one application for `/internal/v1/stores` (`${VAR}`).
    /// Empty: each member makes its own and publishes it with its address on the
    /// instance topic, which only members read.
    pub cluster_secret: String,
    /// Endpoints answered without a key: any of `healthz`, `readyz`, `metrics`.
    pub open: Vec<String>,
    /// Failed authentications one client address may make in `failed_auth_window`
    /// before its requests are refused (429) until the window ends.
    pub failed_auth_limit: u32,
    pub failed_auth_window: Duration,
    /// Load balancers and proxies (addresses or CIDRs) whose `X-Forwarded-For` is
    /// believed: behind them, a client's address (for rate limiting and an event's
    /// `context.ip`) is the last address of that header that is not one of them.
    pub trusted_proxies: Vec<String>,
}

/// One source of events: a website, an app, a backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    /// Every key still accepted (rotation: add the new one, deploy, remove the old).
    pub write_keys: Vec<String>,
    /// The channel its events come from (`web`, `mobile_app`, `store`, ...).
    #[serde(default = "default_channel")]
    pub channel: String,
    /// Browser origins allowed to send with its keys (`https://shop.example.com`,
    /// `http://localhost:*` for any port, `*` for any origin). Empty: no browser.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

fn default_channel() -> String {
    "web".to_owned()
}

/// One secret API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in logs and metrics instead of the key.
    pub name: String,
    /// The bearer token (`${VAR}` from the environment); at least 24 characters.
    pub key: String,
    /// `read:profiles`, `admin:privacy`, `read:*`, `*`, ...
    pub scopes: Vec<String>,
}

/// Endpoints that may be left open.
pub const OPENABLE: [&str; 3] = ["healthz", "readyz", "metrics"];

/// The shortest secret key and token secret accepted: long enough not to be guessed.
pub const MIN_SECRET_LEN: usize = 24;

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            sources: Vec::new(),
            api_keys: Vec::new(),
            token_secret: String::new(),
            token_max_ttl: Duration::hours(1),
            cluster_secret: String::new(),
            open: OPENABLE.iter().map(|s| s.to_string()).collect(),
            failed_auth_limit: 20,
            failed_auth_window: Duration::minutes(1),
            trusted_proxies: Vec::new(),
        }
    }
}

impl AccessConfig {
    pub fn is_open(&self, endpoint: &str) -> bool {
        self.open.iter().any(|e| e == endpoint)
    }

    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut names = std::collections::BTreeSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            let at = format!("access.sources[{i}]");
            if source.name.trim().is_empty() {
                errors.push(config_error(format!("{at}.name"), "must not be empty"));
            }
            if !names.insert(&source.name) {
                errors.push(config_error(format!("{at}.name"), format!("{:?} is declared twice", source.name)));
            }
            if source.write_keys.is_empty() {
                errors.push(config_error(format!("{at}.write_keys"), "needs at least one key"));
            }
            for (j, key) in source.write_keys.iter().enumerate() {
                if key.trim().len() < 8 {
                    errors.push(config_error(format!("{at}.write_keys[{j}]"), "must be at least 8 characters"));
                }
            }
            if source.channel.trim().is_empty() {
                errors.push(config_error(format!("{at}.channel"), "must not be empty"));
            }
            for (j, origin) in source.allowed_origins.iter().enumerate() {
                if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                    errors.push(config_error(
                        format!("{at}.allowed_origins[{j}]"),
                        format!("{origin:?} is not an origin (`https://shop.example.com`, `http://localhost:*`, `*`)"),
                    ));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for source in &self.sources {
            for key in &source.write_keys {
                if !key.starts_with("${") && !seen.insert(key) {
                    errors.push(config_error("access.sources", "a write key belongs to two sources"));
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, key) in self.api_keys.iter().enumerate() {
            let at = format!("access.api_keys[{i}]");
            if key.name.trim().is_empty() {
                errors.push(config_error(format!("{at}.name"), "must not be empty"));
            }
            if !names.insert(&key.name) {
                errors.push(config_error(format!("{at}.name"), format!("{:?} is declared twice", key.name)));
            }
            if !key.key.starts_with("${") && key.key.len() < MIN_SECRET_LEN {
                errors.push(config_error(
                    format!("{at}.key"),
                    format!("must be at least {MIN_SECRET_LEN} characters (or ${{VAR}} from the environment)"),
                ));
            }
            if key.scopes.is_empty() {
                errors.push(config_error(format!("{at}.scopes"), "needs at least one scope"));
            }
            for (j, scope) in key.scopes.iter().enumerate() {
                if Scope::expand(scope).is_none() {
                    let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                    errors.push(config_error(
                        format!("{at}.scopes[{j}]"),
                        format!("unknown scope {scope:?} (known: {}, `read:*`, `*`)", known.join(", ")),
                    ));
                }
            }
        }
        for (path, secret) in
            [("access.token_secret", &self.token_secret), ("access.cluster_secret", &self.cluster_secret)]
        {
            if !secret.is_empty() && !secret.starts_with("${") && secret.len() < MIN_SECRET_LEN {
                errors.push(config_error(path, format!("must be at least {MIN_SECRET_LEN} characters")));
            }
        }
        if self.token_max_ttl.ms() <= 0 {
            errors.push(config_error("access.token_max_ttl", "must be positive"));
        }
        for (i, endpoint) in self.open.iter().enumerate() {
            if !OPENABLE.contains(&endpoint.as_str()) {
                errors.push(config_error(
                    format!("access.open[{i}]"),
                    format!("{endpoint:?} cannot be opened (only {})", OPENABLE.join(", ")),
                ));
            }
        }
        if self.failed_auth_limit == 0 {
            errors.push(config_error("access.failed_auth_limit", "must be at least 1"));
        }
        if self.failed_auth_window.ms() <= 0 {
            errors.push(config_error("access.failed_auth_window", "must be positive"));
        }
        for (i, proxy) in self.trusted_proxies.iter().enumerate() {
            if parse_network(proxy).is_none() {
                errors.push(config_error(
                    format!("access.trusted_proxies[{i}]"),
                    format!("{proxy:?} is not an address or a CIDR (`10.0.0.0/8`, `2001:db8::/32`, `10.1.2.3`)"),
                ));
            }
        }
    }
}

/// An address or a CIDR as a network (an address is a network of one).
pub fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_patterns_expand() {
        assert_eq!(Scope::expand("*").unwrap().len(), Scope::ALL.len());
        let reads = Scope::expand("read:*").unwrap();
        assert!(reads.contains(&Scope::ReadProfiles) && !reads.contains(&Scope::WriteEvents));
        assert_eq!(Scope::expand("admin:privacy"), Some(vec![Scope::AdminPrivacy]));
        assert_eq!(Scope::expand("read:everything"), None);
        assert_eq!(Scope::expand("nope:*"), None);
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn every_mistake_is_reported_with_its_path() {
        let config: AccessConfig = serde_yaml::from_str(
            r#"
sources:
  - {name: web, write_keys: [short], allowed_origins: [example.com]}
  - {name: web, write_keys: []}
api_keys:
  - {name: backend, key: too-short, scopes: [read:everything]}
open: [privacy]
trusted_proxies: [10.0.0.0/8, "192.168.1.7", nonsense]
"#,
        )
        .unwrap();
        let mut errors = Vec::new();
        config.validate(&mut errors);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "access.sources[0].write_keys[0]",
            "access.sources[0].allowed_origins[0]",
            "access.sources[1].name",
            "access.sources[1].write_keys",
            "access.api_keys[0].key",
            "access.api_keys[0].scopes[0]",
            "access.open[0]",
            "access.trusted_proxies[2]",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
    }
}
