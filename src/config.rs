//! Settings: defaults, then a TOML file (`--config`), then `GATEHOUSE_*` environment
//! variables, the environment winning. Every value is typed on load, so a bad setting
//! stops start-up with a message that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::crypto::password::HashParams;
use crate::domain::lockout::LockoutTiers;

/// Where mail goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTransport {
    /// One RFC 5322 `.eml` file per mail in the outbox directory.
    File,
    /// An SMTP server (`GATEHOUSE_SMTP_URL`).
    Smtp,
    /// Only a log line saying a mail was sent (never its content).
    Log,
}

/// `N/S`: N requests per S seconds; `0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub requests: u32,
    /// Window length in seconds.
    pub per_seconds: u32,
}

impl FromStr for RateLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Self { requests: 0, per_seconds: 1 });
        }
        let (n, p) = s.split_once('/').ok_or_else(|| format!("expected REQUESTS/SECONDS such as 60/60, got {s:?}"))?;
        let requests = n.trim().parse().map_err(|_| format!("bad request count {n:?}"))?;
        let per_seconds: u32 = p.trim().parse().map_err(|_| format!("bad seconds {p:?}"))?;
        if per_seconds == 0 {
            return Err("the window must be at least 1 second".into());
        }
        Ok(Self { requests, per_seconds })
    }
}

impl RateLimit {
    /// Whether the limit is switched on.
    pub fn enabled(&self) -> bool {
        self.requests > 0
    }
}

/// A comma-separated list of IPs or CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl FromStr for TrustedProxies {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => IpNet::from(
                    part.parse::<std::net::IpAddr>()
                        .map_err(|_| format!("{part:?} is neither an IP address nor a CIDR"))?,
                ),
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }
}

/// A comma-separated list of web origins (`https://app.example.com`) whose pages may
/// call the API from a browser (CORS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsOrigins(pub Vec<String>);

impl FromStr for CorsOrigins {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut origins = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || format!("{part:?} is not an origin like https://app.example.com");
            let url = url::Url::parse(part).map_err(|_| bad())?;
            // An origin alone: a scheme, a host and perhaps a port; no "*", no path.
            let bare = url.path() == "/"
                && url.query().is_none()
                && url.fragment().is_none()
                && url.username().is_empty()
                && url.password().is_none();
            if !matches!(url.scheme(), "http" | "https") || !bare || part.ends_with('?') || part.ends_with('#') {
                return Err(bad());
            }
            // As browsers send it: host in lower case, a default port left out.
            origins.push(url.origin().ascii_serialization());
        }
        Ok(Self(origins))
    }
}

impl TrustedProxies {
    /// Whether `ip` belongs to a trusted proxy.
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }
}

/// Raw setting value as figment hands it over: environment values that look like
/// numbers arrive as integers.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Str(String),
    Int(i64),
}

macro_rules! deserialize_via_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = match Raw::deserialize(d)? {
                    Raw::Str(s) => s,
                    Raw::Int(i) => i.to_string(),
                };
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
deserialize_via_from_str!(RateLimit, TrustedProxies, CorsOrigins, LockoutTiers, HashParams);

/// Every setting of the service, typed.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// Signing keys' database (by default), the SQLite file, the outbox.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; empty means a SQLite file in the data dir.
    #[serde(default)]
    pub database_url: Option<SecretString>,
    /// Base of links in mails, and the `iss` of access tokens.
    pub public_url: url::Url,
    /// `file`, `smtp` or `log`.
    pub mail_transport: MailTransport,
    /// Where the `file` transport writes; default `<data_dir>/outbox`.
    #[serde(default)]
    pub mail_outbox_dir: Option<PathBuf>,
    /// SMTP server URL, e.g. `smtp://host:25` or `smtps://user:pass@host`.
    #[serde(default)]
    pub smtp_url: Option<SecretString>,
    /// The From header of every mail.
    pub mail_from: String,
    /// Lockout tiers, `failures:seconds` comma separated.
    pub lockout_tiers: LockoutTiers,
    /// Consecutive failures after which only a reset or an admin unlocks.
    pub lockout_hard_limit: u32,
    /// Sessions per user; 0 is unlimited.
    pub device_limit: u32,
    /// Access token lifetime in seconds.
    pub access_token_ttl: u32,
    /// Refresh token lifetime in seconds; also the session's idle limit.
    pub refresh_token_ttl: u32,
    /// Absolute session lifetime in seconds.
    pub session_max_age: u32,
    /// Seconds in which a rotated refresh token returns the same successor.
    pub refresh_grace: u32,
    /// Auth requests per window per client IP.
    pub rate_limit_per_ip: RateLimit,
    /// Mails of each kind that anyone can ask for (verification, reset, the taken-email
    /// notice) per address per window, across instances; 0 turns it off.
    pub mail_per_address: RateLimit,
    /// Parameters for new password hashes.
    pub password_hash: HashParams,
    /// Password hashes computed at once (default: the number of cores).
    #[serde(default)]
    pub hash_workers: Option<usize>,
    /// Password hashes allowed to wait for a worker before logins get 503.
    #[serde(default)]
    pub hash_queue: Option<usize>,
    /// Proxies whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
    /// Web origins whose pages may call the API from a browser (none: same origin only).
    #[serde(default)]
    pub cors_origins: CorsOrigins,
    /// Base64 of 32 bytes: encrypts signing keys at rest (AES-256-GCM). Keep it out of
    /// the database (environment or secret store); every instance needs the same one.
    #[serde(default)]
    pub key_encryption_key: Option<SecretString>,
    /// The `aud` of access tokens.
    pub jwt_audience: String,
    /// A MaxMind city database for `last_login_geolocation`.
    #[serde(default)]
    pub geoip_db: Option<PathBuf>,
    /// Lifetime of the verification link, seconds.
    pub verify_link_ttl: u32,
    /// Lifetime of the 6-digit verification code, seconds.
    pub verify_code_ttl: u32,
    /// Lifetime of a password reset token, seconds.
    pub reset_token_ttl: u32,
    /// Largest database pool (on PostgreSQL a quarter more, rounded up, for the counters,
    /// and one listening connection for the session memory).
    pub db_max_connections: u32,
    /// Seconds to wait for a pooled connection before failing the request.
    pub db_acquire_timeout: u32,
    /// PostgreSQL: sessions each instance remembers for Bearer checks (0: none).
    pub session_cache_entries: u32,
    /// `text` or `json` log lines.
    pub log_format: String,
}

/// The keys of `f` that name no setting (a file's typo would otherwise be ignored). The
/// environment is not checked: other `GATEHOUSE_*` variables (the log filter, tests')
/// live there.
fn unknown_keys(f: &Figment) -> Vec<String> {
    let Ok(merged) = f.extract::<figment::value::Value>() else { return Vec::new() };
    let mut unknown = Vec::new();
    let _ = serde_ignored::deserialize(&merged, |path| unknown.push(path.to_string())) as Result<Settings, _>;
    unknown
}

/// The defaults of the contract, as TOML-equivalent values.
#[derive(Serialize)]
struct Defaults {
    listen: &'static str,
    data_dir: &'static str,
    public_url: &'static str,
    mail_transport: &'static str,
    mail_from: &'static str,
    lockout_tiers: &'static str,
    lockout_hard_limit: u32,
    device_limit: u32,
    access_token_ttl: u32,
    refresh_token_ttl: u32,
    session_max_age: u32,
    refresh_grace: u32,
    rate_limit_per_ip: &'static str,
    mail_per_address: &'static str,
    password_hash: &'static str,
    jwt_audience: &'static str,
    verify_link_ttl: u32,
    verify_code_ttl: u32,
    reset_token_ttl: u32,
    db_max_connections: u32,
    db_acquire_timeout: u32,
    session_cache_entries: u32,
    log_format: &'static str,
}

const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:8080",
    data_dir: "./data",
    public_url: "http://127.0.0.1:8080",
    mail_transport: "file",
    mail_from: "Gatehouse <no-reply@gatehouse.invalid>",
    lockout_tiers: "5:60,10:300,20:3600",
    lockout_hard_limit: 100,
    device_limit: 2,
    access_token_ttl: 3600,
    refresh_token_ttl: 2_592_000,
    session_max_age: 7_776_000,
    refresh_grace: 5,
    rate_limit_per_ip: "60/60",
    mail_per_address: "10/3600",
    password_hash: "argon2id:m=19456,t=2,p=1",
    jwt_audience: "gatehouse",
    verify_link_ttl: 86_400,
    verify_code_ttl: 900,
    reset_token_ttl: 3600,
    db_max_connections: 16,
    db_acquire_timeout: 5,
    session_cache_entries: 10_000,
    log_format: "text",
};

impl Settings {
    /// Loads defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(path) = file {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read the settings file {}: {e}", path.display()))?;
            let unknown = unknown_keys(&Self::figment(file));
            if !unknown.is_empty() {
                anyhow::bail!(
                    "invalid settings: {} has no setting named {} (see the README's Settings)",
                    path.display(),
                    unknown.join(", ")
                );
            }
        }
        Self::from_figment(Self::figment(file).merge(Env::prefixed("GATEHOUSE_")))
    }

    /// Defaults and the file only; tests add their own values on top.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Figment::from(Serialized::defaults(DEFAULTS));
        if let Some(path) = file {
            f = f.merge(Toml::file_exact(path));
        }
        f
    }

    /// Extracts typed settings, naming the bad one on failure.
    pub fn from_figment(f: Figment) -> anyhow::Result<Self> {
        let s: Settings = f.extract().map_err(|e| {
            let mut msg = String::from("invalid settings:");
            for err in e {
                let key = err.path.join(".");
                msg.push_str(&format!("\n  {} (GATEHOUSE_{}): {}", key, key.to_uppercase(), err.kind));
            }
            anyhow::anyhow!(msg)
        })?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.mail_transport == MailTransport::Smtp && self.smtp_url.is_none() {
            anyhow::bail!("invalid settings: mail_transport is smtp but GATEHOUSE_SMTP_URL is not set");
        }
        if self.access_token_ttl == 0 || self.refresh_token_ttl == 0 || self.session_max_age == 0 {
            anyhow::bail!("invalid settings: token and session lifetimes must be at least 1 second");
        }
        if self.db_max_connections == 0 {
            anyhow::bail!("invalid settings: db_max_connections must be at least 1");
        }
        if let Some(k) = &self.key_encryption_key {
            use secrecy::ExposeSecret;
            crate::crypto::jwt::KeyEncryptionKey::parse(k.expose_secret()).map_err(|e| {
                anyhow::anyhow!("invalid settings: key_encryption_key (GATEHOUSE_KEY_ENCRYPTION_KEY) {e}")
            })?;
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            anyhow::bail!("invalid settings: log_format (GATEHOUSE_LOG_FORMAT) must be text or json");
        }
        Ok(())
    }

    /// The database URL in force: the setting, or a SQLite file in the data dir.
    pub fn database_url(&self) -> String {
        use secrecy::ExposeSecret;
        match &self.database_url {
            Some(u) if !u.expose_secret().trim().is_empty() => u.expose_secret().trim().to_owned(),
            // The store creates a SQLite file that is missing (see `sqlite_creating`).
            _ => format!("sqlite://{}", self.data_dir.join("gatehouse.db").display()),
        }
    }

    /// How to open the store, from the database settings.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            max_connections: self.db_max_connections,
            acquire_timeout_secs: self.db_acquire_timeout,
            session_cache_entries: self.session_cache_entries,
        }
    }

    /// The outbox directory in force.
    pub fn outbox_dir(&self) -> PathBuf {
        self.mail_outbox_dir.clone().unwrap_or_else(|| self.data_dir.join("outbox"))
    }

    /// Hash workers in force.
    pub fn hash_workers(&self) -> usize {
        self.hash_workers
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// Hash queue length in force.
    pub fn hash_queue(&self) -> usize {
        self.hash_queue.unwrap_or(self.hash_workers() * 8)
    }

    /// The issuer: the public URL without a trailing slash.
    pub fn issuer(&self) -> String {
        self.public_url.as_str().trim_end_matches('/').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let mut f = Settings::figment(None);
        for (k, v) in pairs {
            f = f.merge((*k, *v));
        }
        Settings::from_figment(f)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = with(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.device_limit, 2);
        assert_eq!(s.refresh_grace, 5);
        assert_eq!(s.rate_limit_per_ip, RateLimit { requests: 60, per_seconds: 60 });
        assert_eq!(s.lockout_tiers.0, vec![(5, 60), (10, 300), (20, 3600)]);
        assert!(s.database_url().starts_with("sqlite://"));
        assert_eq!(s.outbox_dir(), PathBuf::from("./data/outbox"));
    }

    #[test]
    fn environment_style_values_parse() {
        let mut f = Settings::figment(None);
        f = f.merge(("rate_limit_per_ip", 0)).merge(("device_limit", 5));
        let s = Settings::from_figment(f).unwrap();
        assert!(!s.rate_limit_per_ip.enabled());
        assert_eq!(s.device_limit, 5);
    }

    #[test]
    fn a_bad_setting_is_named_in_the_error() {
        let err = with(&[("lockout_tiers", "five:60")]).unwrap_err().to_string();
        assert!(err.contains("GATEHOUSE_LOCKOUT_TIERS"), "{err}");
        let err = with(&[("listen", "nowhere")]).unwrap_err().to_string();
        assert!(err.contains("GATEHOUSE_LISTEN"), "{err}");
        let err = with(&[("password_hash", "md5")]).unwrap_err().to_string();
        assert!(err.contains("GATEHOUSE_PASSWORD_HASH"), "{err}");
    }

    #[test]
    fn only_keys_that_name_no_setting_are_unknown() {
        let known = Settings::figment(None)
            .merge(("device_limit", 3))
            .merge(("smtp_url", "smtp://x:25"))
            .merge(("trusted_proxies", "10.0.0.1"));
        assert!(unknown_keys(&known).is_empty(), "{:?}", unknown_keys(&known));
        let typo = Settings::figment(None).merge(("device_limt", 3)).merge(("lockout_tiers", "3:30"));
        assert_eq!(unknown_keys(&typo), vec!["device_limt".to_owned()]);
    }

    #[test]
    fn trusted_proxies_take_ips_and_cidrs() {
        let t: TrustedProxies = "10.0.0.1, 192.168.0.0/16".parse().unwrap();
        assert!(t.contains(&"10.0.0.1".parse().unwrap()));
        assert!(t.contains(&"192.168.4.4".parse().unwrap()));
        assert!(!t.contains(&"10.0.0.2".parse().unwrap()));
        assert!("nonsense".parse::<TrustedProxies>().is_err());
    }

    #[test]
    fn cors_origins_are_origins_only() {
        let o: CorsOrigins = "https://app.example.com, http://localhost:5173".parse().unwrap();
        assert_eq!(o.0, vec!["https://app.example.com", "http://localhost:5173"]);
        assert_eq!("https://app.example.com/".parse::<CorsOrigins>().unwrap().0, vec!["https://app.example.com"]);
        let o: CorsOrigins = "https://App.Example.com, https://a.example:443, http://a.example:8080".parse().unwrap();
        assert_eq!(o.0, vec!["https://app.example.com", "https://a.example", "http://a.example:8080"]);
        for bad in [
            "*",
            "app.example.com",
            "https://app.example.com/login",
            "ftp://x.example",
            "https://a.example?x=1",
            "https://u@a.example",
        ] {
            assert!(bad.parse::<CorsOrigins>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limit_parses_and_rejects() {
        assert_eq!("10/1".parse::<RateLimit>().unwrap().requests, 10);
        assert!("10/0".parse::<RateLimit>().is_err());
        assert!("ten".parse::<RateLimit>().is_err());
    }
}
