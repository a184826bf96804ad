//! `App::build(settings)`: the one constructor of the running service, used by the
//! binary and the tests alike.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use lettre::message::Mailbox;
use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::crypto::jwt::{AccessTokens, KeyEncryptionKey, SigningKey};
use crate::crypto::password::PasswordHasher;
use crate::domain::lockout::LockoutPolicy;
use crate::http::{self, AppState};
use crate::mail;
use crate::service::mail_jobs::MailWorker;
use crate::service::{GeoLookup, Policy, Services};
use crate::store;
use secrecy::ExposeSecret;

/// How long after the shutdown signal the password checks under way are waited for (a
/// full hashing queue takes about eight hashes' time; a request at most 30 s).
const CHECKS_AT_SHUTDOWN: Duration = Duration::from_secs(30);

/// A built service: its router and shared state.
pub struct App {
    /// The HTTP router, ready to serve.
    pub router: Router,
    /// Shared state (services, metrics).
    pub state: AppState,
}

impl App {
    /// Builds the service on the real clock.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        Self::build_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Builds the service with a given clock (tests use a manual one).
    pub async fn build_with_clock(settings: &Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let services = services(settings, clock, true).await?;
        let (router, state) = http::router(
            services,
            settings.trusted_proxies.clone(),
            settings.rate_limit_per_ip,
            &settings.cors_origins,
        );
        Ok(Self { router, state })
    }

    /// Serves on `listener` until `shutdown` completes; also runs housekeeping.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let housekeeping = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                let now = state.services.now();
                match state.services.store.purge_expired(now).await {
                    Ok(n) => tracing::debug!(rows = n, "purged expired rows"),
                    Err(e) => tracing::warn!(error = %e, "purging expired rows failed"),
                }
            }
        });
        let asked = Arc::new(std::sync::OnceLock::new());
        let shutdown = {
            let asked = asked.clone();
            async move {
                shutdown.await;
                let _ = asked.set(tokio::time::Instant::now());
            }
        };
        let served = axum::serve(listener, self.router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await;
        housekeeping.abort();
        // A check whose client hung up (or whose request timed out) is still acted on:
        // a wrong password counted and recorded, a lock settled. Waited for before the
        // store closes and the runtime (with the checks' tasks) ends, until one deadline
        // counted from the signal (the requests still answered meanwhile count against it).
        let checks = &self.state.password_checks;
        checks.close();
        let deadline = asked.get().copied().unwrap_or_else(tokio::time::Instant::now) + CHECKS_AT_SHUTDOWN;
        if tokio::time::timeout_at(deadline, checks.wait()).await.is_err() {
            tracing::warn!(running = checks.len(), "stopping with password checks still running");
        }
        self.state.services.store.close().await;
        Ok(served?)
    }
}

/// Builds the services: store (migrated), signing key, hasher, mail, GeoIP. With
/// `mail_worker`, this process also works off the mail queue (a one-shot command does
/// not: it could claim a mail and exit).
pub async fn services(settings: &Settings, clock: Arc<dyn Clock>, mail_worker: bool) -> anyhow::Result<Services> {
    let store = store::open(&settings.database_url(), &settings.store_options()).await?;
    let kek = match &settings.key_encryption_key {
        Some(k) => {
            Some(KeyEncryptionKey::parse(k.expose_secret()).map_err(|e| anyhow::anyhow!("key_encryption_key: {e}"))?)
        }
        None => None,
    };
    let candidate = SigningKey::generate(clock.now())?;
    let candidate = match &kek {
        Some(kek) => candidate.sealed(kek)?,
        None => candidate,
    };
    let (active, all) =
        store.signing_keys(&candidate).await.map_err(|e| anyhow::anyhow!("loading signing keys: {e}"))?;
    if kek.is_some() && all.iter().any(|k| !k.is_sealed()) {
        tracing::warn!(
            "some signing keys were stored before GATEHOUSE_KEY_ENCRYPTION_KEY was set and remain unencrypted"
        );
    }
    let active = active.opened(kek.as_ref())?;
    let all = all.into_iter().map(|k| k.opened(kek.as_ref())).collect::<anyhow::Result<Vec<_>>>()?;
    let tokens = AccessTokens::new(
        &active,
        &all,
        settings.issuer(),
        settings.jwt_audience.clone(),
        i64::from(settings.access_token_ttl),
    )?;
    let hasher = PasswordHasher::start(settings.password_hash, settings.hash_workers(), settings.hash_queue());
    let from: Mailbox = settings
        .mail_from
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid settings: mail_from (GATEHOUSE_MAIL_FROM) is not a mail address"))?;
    let mail_wake = Arc::new(tokio::sync::Notify::new());
    let geo: Option<Box<dyn GeoLookup>> = match &settings.geoip_db {
        Some(path) => Some(Box::new(MaxMindGeo::open(path)?)),
        None => None,
    };
    let policy = Policy {
        lockout: LockoutPolicy { tiers: settings.lockout_tiers.clone(), hard_limit: settings.lockout_hard_limit },
        device_limit: settings.device_limit,
        refresh_ttl: i64::from(settings.refresh_token_ttl),
        session_max_age: i64::from(settings.session_max_age),
        refresh_grace: i64::from(settings.refresh_grace),
        verify_link_ttl: settings.verify_link_ttl,
        verify_code_ttl: settings.verify_code_ttl,
        reset_ttl: settings.reset_token_ttl,
        public_url: settings.issuer(),
        mail_per_address: settings.mail_per_address,
    };
    let worker = MailWorker {
        store: store.clone(),
        clock: clock.clone(),
        mailer: mail::mailer_from(settings)?,
        from,
        policy: policy.clone(),
        wake: mail_wake.clone(),
    };
    if mail_worker {
        tokio::spawn(worker.run());
    }
    Ok(Services {
        store,
        clock,
        hasher,
        tokens,
        mail_wake,
        policy,
        geo,
        refused_locks: Default::default(),
        recent_touches: Default::default(),
    })
}

/// GeoIP lookups in a MaxMind city database.
pub struct MaxMindGeo(maxminddb::Reader<Vec<u8>>);

impl MaxMindGeo {
    /// Opens the database file.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        maxminddb::Reader::open_readfile(path)
            .map(Self)
            .map_err(|e| anyhow::anyhow!("invalid settings: geoip_db (GATEHOUSE_GEOIP_DB) {}: {e}", path.display()))
    }
}

impl GeoLookup for MaxMindGeo {
    fn locate(&self, ip: IpAddr) -> Option<serde_json::Value> {
        let city: maxminddb::geoip2::City = self.0.lookup(ip).ok()?;
        let en = |names: Option<&std::collections::BTreeMap<&str, &str>>| {
            names.and_then(|n| n.get("en").map(|s| s.to_string()))
        };
        let country = city.country.as_ref();
        let location = city.location.as_ref();
        Some(serde_json::json!({
            "country_code": country.and_then(|c| c.iso_code),
            "country": en(country.and_then(|c| c.names.as_ref())),
            "region": en(city.subdivisions.as_ref().and_then(|s| s.first()).and_then(|s| s.names.as_ref())),
            "city": en(city.city.as_ref().and_then(|c| c.names.as_ref())),
            "latitude": location.and_then(|l| l.latitude),
            "longitude": location.and_then(|l| l.longitude),
            "timezone": location.and_then(|l| l.time_zone),
        }))
    }
}
