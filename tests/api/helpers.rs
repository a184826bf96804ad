//! The test harness: a real Gatehouse on 127.0.0.1:0 with a manual clock, on SQLite
//! or on a fresh PostgreSQL schema, with helpers to read its outbox.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use figment::Figment;
use gatehouse::app::App;
use gatehouse::clock::ManualClock;
use gatehouse::config::Settings;
use gatehouse::http::AppState;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

pub use crate::common::{fresh_database, Backend};

/// The password every test user gets.
pub const PASSWORD: &str = "correct horse battery staple";

/// A running instance.
pub struct TestApp {
    pub addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub state: AppState,
    pub client: reqwest::Client,
    pub outbox: PathBuf,
    /// The database's URL (PostgreSQL: with the test's own schema).
    pub db_url: String,
    /// Asks the server to shut down gracefully (see [`TestApp::shut_down`]).
    stop: Arc<tokio::sync::Notify>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestApp {
    /// Defaults for tests: cheap hashing, no per-IP limit, file mail.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |f| f).await
    }

    /// Like [`spawn`], with extra settings.
    pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(Figment) -> Figment) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = fresh_database(backend, dir.path()).await;
        let f = Settings::figment(None)
            .merge(("data_dir", dir.path().display().to_string()))
            .merge(("database_url", url.clone()))
            .merge(("password_hash", "argon2id:m=64,t=1,p=1"))
            .merge(("rate_limit_per_ip", "0"))
            .merge(("db_max_connections", 8))
            .merge(("hash_workers", 2))
            .merge(("hash_queue", 256));
        let settings = Settings::from_figment(tweak(f)).expect("test settings");
        let clock = Arc::new(ManualClock::starting_now());
        let app = App::build_with_clock(&settings, clock.clone()).await.expect("build app");
        let state = app.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(tokio::sync::Notify::new());
        let asked = stop.clone();
        let served = tokio::spawn(app.serve(listener, async move { asked.notified().await }));
        Self {
            addr,
            clock,
            state,
            client: reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("client"),
            outbox: settings.outbox_dir(),
            db_url: url,
            stop,
            served: Some(served),
            _dir: dir,
        }
    }

    /// Shuts the server down as a signal would, and waits until `App::serve` has
    /// returned. The state (and its store) stays usable.
    pub async fn shut_down(&mut self) {
        self.stop.notify_one();
        let served = self.served.take().expect("the server is running");
        served.await.expect("serve panicked").expect("serve failed");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.client.post(self.url(path)).json(&body).send().await.expect("request")
    }

    pub async fn post_bearer(&self, path: &str, token: &str, body: Option<Value>) -> Response {
        let mut r = self.client.post(self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.expect("request")
    }

    pub async fn get_bearer(&self, path: &str, token: &str) -> Response {
        self.client.get(self.url(path)).bearer_auth(token).send().await.expect("request")
    }

    pub async fn delete_bearer(&self, path: &str, token: &str) -> Response {
        self.client.delete(self.url(path)).bearer_auth(token).send().await.expect("request")
    }

    pub async fn register(&self, email: &str) -> Response {
        self.post("/v1/auth/register", json!({"email": email, "password": PASSWORD})).await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post("/v1/auth/login", json!({"email": email, "password": password})).await
    }

    /// Registers, verifies by link and returns the user JSON.
    pub async fn verified_user(&self, email: &str) -> Value {
        assert_eq!(self.register(email).await.status(), StatusCode::ACCEPTED);
        let mail = self.wait_mail(email, "Verify").await;
        let r = self.post("/v1/auth/verify-email", json!({"token": link_token(&mail)})).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.expect("user")
    }

    /// A verified user, logged in: the TokenResponse.
    pub async fn logged_in(&self, email: &str) -> Value {
        self.verified_user(email).await;
        self.login_ok(email).await
    }

    pub async fn login_ok(&self, email: &str) -> Value {
        let r = self.login(email, PASSWORD).await;
        assert_eq!(r.status(), StatusCode::OK, "login of {email}");
        r.json().await.expect("token response")
    }

    /// An admin made through the store, logged in.
    pub async fn admin(&self, email: &str) -> Value {
        self.state
            .services
            .create_user_directly(email, PASSWORD.to_owned().into(), gatehouse::domain::user::Role::Admin, true)
            .await
            .expect("create admin");
        self.login_ok(email).await
    }

    /// Every mail to `to`, oldest first.
    pub fn mails_to(&self, to: &str) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.outbox) else {
            return vec![];
        };
        let mut files: Vec<_> =
            rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "eml")).collect();
        files.sort();
        files
            .into_iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter(|m| m.lines().any(|l| l.eq_ignore_ascii_case(&format!("To: {to}"))))
            .collect()
    }

    /// Waits (bounded) for the newest mail to `to` whose subject contains `subject`.
    pub async fn wait_mail(&self, to: &str, subject: &str) -> String {
        self.wait_mails(to, subject, 1).await.pop().expect("a mail")
    }

    /// Waits (bounded) until at least `n` mails to `to` with `subject` exist.
    pub async fn wait_mails(&self, to: &str, subject: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<String> = self
                .mails_to(to)
                .into_iter()
                .filter(|m| m.lines().any(|l| l.starts_with("Subject:") && l.contains(subject)))
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(Instant::now() < deadline, "no {n} mail(s) '{subject}' to {to} within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Gives background work (mail) a moment, then asserts nothing arrived for `to`.
    pub async fn assert_no_mail_with(&self, to: &str, subject: &str) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = self.mails_to(to).iter().filter(|m| m.contains(subject)).count();
        assert_eq!(n, 0, "unexpected '{subject}' mail to {to}");
    }
}

/// The `token=` value of a mailed link.
pub fn link_token(mail: &str) -> String {
    let start = mail.find("token=").expect("a token link") + "token=".len();
    mail[start..].chars().take_while(|c| c.is_ascii_alphanumeric()).collect()
}

/// The 6-digit code of a verification mail.
pub fn code(mail: &str) -> String {
    mail.lines()
        .map(str::trim)
        .find(|l| l.len() == 6 && l.chars().all(|c| c.is_ascii_digit()))
        .expect("a 6-digit code")
        .to_owned()
}

/// Asserts a problem+json answer with `status` and `code`; returns the body.
pub async fn assert_problem(r: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(r.status(), status, "status for {code}");
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert_eq!(ct, "application/problem+json");
    let body: Value = r.json().await.expect("problem body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].is_string() && body["title"].is_string() && body["detail"].is_string());
    body
}

/// The `Retry-After` header in seconds.
pub fn retry_after(r: &Response) -> u64 {
    r.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After header")
}

pub fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}")).to_owned()
}
