//! PostgreSQL: each instance's memory of sessions and their users, for the Bearer check.
//!
//! Every authenticated request reads its session and user. On PostgreSQL that read is a
//! query through a pool, which held `GET /v1/me` to a quarter of the throughput it has on
//! SQLite (see the README's Performance section). Here each instance remembers what it
//! read, and forgets a user's entries when PostgreSQL reports a change, without ever
//! answering from memory a session that was ended before the request arrived, on this
//! instance or any other:
//!
//! - Triggers on `users` and `sessions` (migration 0003) send the user's id on the
//!   channel `gatehouse_cache` with every change, whoever makes it (any instance, an
//!   operator's SQL). PostgreSQL delivers notifications at commit, to every listening
//!   connection, in commit order.
//! - Read barrier: before a remembered entry is used, the request waits for a *fence*, a
//!   notification this instance sends after the request arrived. Whatever committed
//!   before the request arrived committed before the fence, so its notification has
//!   been handled when the fence comes back. One fence serves every request waiting at
//!   the time, so under load it costs one tiny transaction per batch of requests instead
//!   of a query per request; it adds about one notification round trip to the answer.
//! - A read that began before a notification was handled does not keep its (possibly
//!   older) result: every notification moves an epoch, and a result is kept only if the
//!   epoch is the one seen before the read.
//! - Without a listening connection (at start, after a lost connection) the memory is
//!   empty and unused until listening starts again: every read goes to the database. A
//!   fence that does not come back in time sends the request to the database too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::Executor;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use super::Session;
use crate::domain::user::User;

/// The notification channel the triggers of migration 0003 use.
pub const CHANNEL: &str = "gatehouse_cache";

/// The payload of migration 0003's TRUNCATE triggers: forget everything.
const FORGET_ALL: &str = "all";

/// Fence timeouts in a row after which the listening connection is presumed dead.
const MISSED_FENCES_LIMIT: u32 = 3;

/// How long a request waits for its fence before reading the database instead.
const FENCE_WAIT: Duration = Duration::from_millis(250);

/// How long sending one fence may take before the connection is presumed dead.
const FENCE_SEND_LIMIT: Duration = Duration::from_secs(5);

/// "Listening stopped": releases every request waiting for a fence.
const NOT_LISTENING: u64 = u64::MAX;

/// Sessions and their users, forgotten by user.
pub struct SessionCache {
    state: Mutex<State>,
    capacity: usize,
    /// This instance's own channel, for its fences only: other instances never see them
    /// (PostgreSQL has one queue, so they stay in commit order with the triggers'
    /// notifications on the same connection).
    fence_channel: String,
    /// The number of the last fence sent; a request needs the one after.
    fence_sent: AtomicU64,
    /// The number of the last fence that came back ([`NOT_LISTENING`] when not listening).
    fence_arrived: watch::Sender<u64>,
    /// Wakes the listener to send a fence when a request waits.
    fence_wanted: Notify,
    /// Fences that did not come back in time, in a row.
    fences_missed: AtomicU32,
    /// Tells the listener to drop its connection and listen anew.
    relisten: Notify,
}

#[derive(Default)]
struct State {
    /// Whether the listener is listening; entries are kept and used only then.
    listening: bool,
    /// Moves with every notification and every reset.
    epoch: u64,
    sessions: HashMap<Uuid, (Session, User)>,
    by_user: HashMap<Uuid, Vec<Uuid>>,
}

impl SessionCache {
    /// A memory of at most `capacity` sessions, unused until [`listen`] starts.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            capacity,
            fence_channel: format!("gatehouse_fence_{}", Uuid::new_v4().simple()),
            fence_sent: AtomicU64::new(0),
            fence_arrived: watch::Sender::new(NOT_LISTENING),
            fence_wanted: Notify::new(),
            fences_missed: AtomicU32::new(0),
            relisten: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code below panics while holding the lock; recover the data if one ever did.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The remembered session and user, if any, as of this call: waits for a fence sent
    /// after the call began (see the module's read barrier).
    pub async fn get(&self, sid: Uuid) -> Option<(Session, User)> {
        if !self.state().sessions.contains_key(&sid) {
            return None;
        }
        if !self.barrier().await {
            return None;
        }
        let state = self.state();
        if !state.listening {
            return None;
        }
        state.sessions.get(&sid).cloned()
    }

    /// Waits until every change committed before the call has been handled; false if
    /// that could not be established in time.
    async fn barrier(&self) -> bool {
        let mut arrived = self.fence_arrived.subscribe();
        let needed = self.fence_sent.load(Ordering::SeqCst) + 1;
        self.fence_wanted.notify_one();
        let came = tokio::time::timeout(FENCE_WAIT, arrived.wait_for(|a| *a >= needed)).await;
        let passed = matches!(came, Ok(Ok(ref a)) if **a != NOT_LISTENING);
        if came.is_err() {
            // A connection can die silently (a failover that drops packets): after a few
            // fences lost in a row, listen anew rather than wait on every request.
            if self.fences_missed.fetch_add(1, Ordering::Relaxed) + 1 >= MISSED_FENCES_LIMIT {
                self.fences_missed.store(0, Ordering::Relaxed);
                self.relisten.notify_one();
            }
        } else {
            self.fences_missed.store(0, Ordering::Relaxed);
        }
        passed
    }

    /// The epoch to pass to [`put`] before reading the database; `None` when not listening.
    pub fn epoch(&self) -> Option<u64> {
        let state = self.state();
        state.listening.then_some(state.epoch)
    }

    /// Remembers a session read after [`epoch`] returned `epoch`, unless a change was
    /// handled since (then the read may predate the change).
    pub fn put(&self, epoch: u64, session: Session, user: User) {
        let mut state = self.state();
        if !state.listening || state.epoch != epoch {
            return;
        }
        if state.sessions.len() >= self.capacity && !state.sessions.contains_key(&session.id) {
            // Full: start again rather than track recency on every hit.
            state.sessions.clear();
            state.by_user.clear();
        }
        let (sid, uid) = (session.id, user.id);
        if state.sessions.insert(sid, (session, user)).is_none() {
            state.by_user.entry(uid).or_default().push(sid);
        }
    }

    /// Handles one notification: on the shared channel a user id (or "forget all"), on
    /// this instance's channel a fence.
    fn notified(&self, channel: &str, payload: &str) {
        if channel == self.fence_channel {
            self.fence_arrived_n(payload);
        } else if payload == FORGET_ALL {
            let mut state = self.state();
            state.epoch += 1;
            state.sessions.clear();
            state.by_user.clear();
        } else if let Ok(uid) = Uuid::parse_str(payload) {
            let mut state = self.state();
            state.epoch += 1;
            if let Some(sids) = state.by_user.remove(&uid) {
                for sid in sids {
                    state.sessions.remove(&sid);
                }
            }
        }
    }

    /// A fence came back. Only a number already sent counts: anything else on the
    /// channel (which only this instance's fences should use) is ignored.
    fn fence_arrived_n(&self, payload: &str) {
        let Ok(n) = payload.parse::<u64>() else { return };
        if n == NOT_LISTENING || n > self.fence_sent.load(Ordering::SeqCst) {
            return;
        }
        self.fence_arrived.send_if_modified(|a| {
            let newer = *a != NOT_LISTENING && *a < n;
            if newer {
                *a = n;
            }
            newer
        });
    }

    /// Forgets everything; uses the memory again only if `listening`.
    fn reset(&self, listening: bool) {
        let mut state = self.state();
        state.epoch += 1;
        state.sessions.clear();
        state.by_user.clear();
        state.listening = listening;
        // Not listening: waiting requests go to the database. Listening again: fences
        // sent before are void, the next one counts. Published under the lock, so a
        // request released by this value finds the memory as this reset left it.
        let arrived = if listening { self.fence_sent.load(Ordering::SeqCst) } else { NOT_LISTENING };
        self.fence_arrived.send_replace(arrived);
        drop(state);
    }

    /// Waits up to `limit` for the listener to listen; whether it does.
    pub async fn wait_listening(&self, limit: Duration) -> bool {
        let mut rx = self.fence_arrived.subscribe();
        let listening =
            tokio::time::timeout(limit, rx.wait_for(|a| *a != NOT_LISTENING)).await.is_ok_and(|r| r.is_ok());
        listening
    }

    /// Listens on `url` for as long as the task runs, reconnecting after a loss.
    pub async fn listen(self: Arc<Self>, url: String) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen_once(&url).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "session memory: cannot listen; reading sessions from the database");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            self.reset(false);
            tokio::time::sleep(backoff).await;
        }
    }

    /// One connection's life: returns when it is lost (or presumed lost).
    ///
    /// The same connection sends the fences, whenever a request waits for one sent after
    /// it arrived. PostgreSQL hands a session its own notifications at commit, after all
    /// those committed before, so a fence needs one statement's round trip; whatever
    /// arrives meanwhile is buffered in order and handled before the fence.
    async fn listen_once(&self, url: &str) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect(url).await?;
        listener.eager_reconnect(false);
        // A fence carries no data: its commit need not wait for the disk.
        (&mut listener).execute("SET synchronous_commit = off").await?;
        listener.listen_all([CHANNEL, self.fence_channel.as_str()]).await?;
        // Listening from here on: what is read from now on will be reported if it changes.
        self.reset(true);
        // A request to listen anew made before this connection is void (polled once).
        let _ = tokio::time::timeout(Duration::ZERO, self.relisten.notified()).await;
        loop {
            tokio::select! {
                biased;
                () = self.relisten.notified() => {
                    tracing::warn!("session memory: fences are not coming back; listening anew");
                    return Ok(());
                }
                n = listener.try_recv() => match n? {
                    Some(n) => self.notified(n.channel(), n.payload()),
                    None => break,
                },
                () = self.fence_wanted.notified() => {
                    let n = self.fence_sent.fetch_add(1, Ordering::SeqCst) + 1;
                    // NOTIFY takes no parameters; the channel and payload are hex and digits.
                    let sql = format!("NOTIFY {}, '{n}'", self.fence_channel);
                    // A slow fence only delays the requests waiting for it (they read the
                    // database after FENCE_WAIT); fences that keep failing to come back
                    // make `barrier` ask for a new connection.
                    match tokio::time::timeout(FENCE_SEND_LIMIT, (&mut listener).execute(sql.as_str())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            tracing::warn!("session memory: a fence took too long to send; listening anew");
                            return Ok(());
                        }
                    }
                }
            }
        }
        tracing::warn!("session memory: connection lost; reading sessions from the database until it is back");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::user::{Role, Status};

    fn entry(uid: Uuid) -> (Session, User) {
        let session = Session {
            id: Uuid::new_v4(),
            user_id: uid,
            created_at: 0,
            last_used_at: 0,
            expires_at: 100,
            ip: None,
            user_agent: None,
            ended_at: None,
        };
        let user = User {
            id: uid,
            email: "a@example.com".into(),
            name: None,
            password_hash: None,
            role: Role::User,
            status: Status::Active,
            email_verified_at: None,
            created_at: 0,
            updated_at: 0,
            last_login_at: None,
            last_login_geolocation: None,
            metadata: serde_json::json!({}),
        };
        (session, user)
    }

    /// Plays the listener for one fence, without a database.
    async fn answer_one_fence(cache: Arc<SessionCache>) {
        cache.fence_wanted.notified().await;
        let n = cache.fence_sent.fetch_add(1, Ordering::SeqCst) + 1;
        cache.notified(&cache.fence_channel, &n.to_string());
    }

    #[tokio::test]
    async fn unused_until_listening() {
        let cache = SessionCache::new(10);
        assert_eq!(cache.epoch(), None);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(0, s, u);
        assert!(cache.get(sid).await.is_none());
    }

    #[tokio::test]
    async fn an_entry_is_answered_only_after_a_fence_sent_after_the_request() {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(cache.epoch().expect("listening"), s, u);
        // A fence that came back before the request does not count.
        cache.notified(&cache.fence_channel, "0");
        let (got, ()) = tokio::join!(cache.get(sid), answer_one_fence(cache.clone()));
        assert_eq!(got.map(|(s, _)| s.id), Some(sid));
    }

    #[tokio::test(start_paused = true)]
    async fn without_its_fence_a_request_reads_the_database() {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(cache.epoch().expect("listening"), s, u);
        // Another instance's fence, a number never sent (as someone else could send on
        // this channel), or none at all, releases nothing.
        cache.notified("gatehouse_fence_other", "1");
        cache.notified(&cache.fence_channel, "1");
        cache.notified(&cache.fence_channel, &u64::MAX.to_string());
        assert!(cache.get(sid).await.is_none());
    }

    #[tokio::test]
    async fn a_notification_forgets_the_users_sessions_and_refuses_reads_begun_before_it() {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let uid = Uuid::new_v4();
        let (s1, u1) = entry(uid);
        let (s2, u2) = entry(uid);
        let (other, other_user) = entry(Uuid::new_v4());
        let (sid1, sid2, other_sid) = (s1.id, s2.id, other.id);
        let epoch = cache.epoch().expect("listening");
        cache.put(epoch, s1, u1);
        cache.put(epoch, other, other_user);

        cache.notified(CHANNEL, &uid.to_string());
        assert!(cache.get(sid1).await.is_none(), "the user's session is forgotten");
        let (kept, ()) = tokio::join!(cache.get(other_sid), answer_one_fence(cache.clone()));
        assert!(kept.is_some(), "other users' sessions are kept");
        cache.put(epoch, s2, u2);
        assert!(!cache.state().sessions.contains_key(&sid2), "a read begun before the notification is not kept");
    }

    #[tokio::test]
    async fn losing_the_listener_forgets_everything_and_releases_waiting_requests() {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(cache.epoch().expect("listening"), s, u);
        let lose = async {
            tokio::task::yield_now().await;
            cache.reset(false);
        };
        let started = std::time::Instant::now();
        let (got, ()) = tokio::join!(cache.get(sid), lose);
        assert!(got.is_none());
        assert!(started.elapsed() < FENCE_WAIT, "released at once, not by the timeout");
    }

    #[tokio::test]
    async fn a_truncation_forgets_everything() {
        let cache = SessionCache::new(10);
        cache.reset(true);
        let (s, u) = entry(Uuid::new_v4());
        let sid = s.id;
        cache.put(cache.epoch().expect("listening"), s, u);
        cache.notified(CHANNEL, FORGET_ALL);
        assert!(cache.get(sid).await.is_none());
    }

    #[test]
    fn a_full_memory_starts_again() {
        let cache = SessionCache::new(2);
        cache.reset(true);
        let epoch = cache.epoch().expect("listening");
        let entries: Vec<_> = (0..3).map(|_| entry(Uuid::new_v4())).collect();
        let sids: Vec<Uuid> = entries.iter().map(|(s, _)| s.id).collect();
        for (s, u) in entries {
            cache.put(epoch, s, u);
        }
        let state = cache.state();
        assert!(!state.sessions.contains_key(&sids[0]));
        assert!(state.sessions.contains_key(&sids[2]));
    }
}
