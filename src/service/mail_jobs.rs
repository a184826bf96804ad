//! The mail queue's worker. Requests queue mail in the database (`Store::enqueue_mail`,
//! or inside their own transaction); this worker, running in every instance, claims one
//! due mail at a time, does what it announces (issuing verification or reset tokens
//! when the account qualifies) and sends it, then deletes it. A failed send is tried
//! again with growing delays, up to ten times over about three hours. A crash between sending and deleting
//! sends a mail twice, never zero times.
//!
//! Deciding whether the account qualifies here, and not on the request path, is what
//! lets register, resend-verification and forgot-password do the same work and give
//! the same answer for every email.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use tokio::sync::Notify;
use uuid::Uuid;

use super::Policy;
use crate::clock::Clock;
use crate::crypto::tokens;
use crate::domain::user::Status;
use crate::mail::{deliver, templates, Mail, Mailer, UnusableRecipient};
use crate::store::{MailJob, MailKind, NewOneTimeToken, Store};

/// Tries before a mail is given up: with delays doubling from 10 s up to an hour
/// between them, a mail outlives about three hours of mail-server outage.
pub const MAX_ATTEMPTS: u32 = 10;
/// Seconds a claimed mail is reserved for its worker (a send gives up after 10 s).
const LEASE: i64 = 30;

/// Works off the mail queue.
pub struct MailWorker {
    /// Persistence.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Transport.
    pub mailer: Arc<dyn Mailer>,
    /// The From of every mail.
    pub from: Mailbox,
    /// Token lifetimes and the public URL.
    pub policy: Policy,
    /// Rung when this instance queues a mail.
    pub wake: Arc<Notify>,
}

impl MailWorker {
    /// Runs until the task is dropped.
    pub async fn run(self) {
        loop {
            let now = self.clock.now();
            match self.store.claim_mail_job(now, LEASE).await {
                Ok(Some(job)) => self.work(job).await,
                Ok(None) => {
                    // Other instances' mail is found by polling; ours wakes us at once.
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the mail queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn work(&self, job: MailJob) {
        // The claim must outlast the work, or another instance would send it again.
        let budget = Duration::from_secs(u64::try_from(LEASE - 5).unwrap_or(1));
        let outcome = match tokio::time::timeout(budget, self.render_and_send(&job)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("sending took longer than the claim")),
        };
        let done = match outcome {
            Ok(()) => self.store.finish_mail_job(job.id, job.lease).await,
            // An address accepted before the email check asked the mailer's parser.
            Err(e) if e.is::<UnusableRecipient>() => {
                tracing::error!(error = %e, kind = ?job.kind, "mail given up: it cannot be addressed");
                self.store.finish_mail_job(job.id, job.lease).await
            }
            Err(e) if job.attempts >= MAX_ATTEMPTS => {
                tracing::error!(error = %e, kind = ?job.kind, "mail given up after {MAX_ATTEMPTS} tries");
                self.store.finish_mail_job(job.id, job.lease).await
            }
            Err(e) => {
                tracing::warn!(error = %e, kind = ?job.kind, attempt = job.attempts, "sending mail failed; will retry");
                let delay = (10 * 2i64.pow(job.attempts.saturating_sub(1).min(12))).min(3600);
                self.store.retry_mail_job(job.id, job.lease, self.clock.now() + delay).await
            }
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not update the mail queue");
        }
    }

    /// Whether a mail that anyone can ask for (by registering a taken email, asking for
    /// a verification or a reset), one that would go out, is within its address's share
    /// of that kind: without it, many clients (each within its own per-IP limit) could
    /// flood one inbox. Asked only once the account qualifies and before anything is
    /// issued, so a mail held back supersedes nothing: the address got `n` mails of the
    /// same kind within the window, whose links still work (unless a window is longer
    /// than their life). Counted once per mail, at its first try, in the database
    /// (every instance shares the count), under a hash of the address. If the count
    /// cannot be read, the mail goes.
    async fn within_address_limit(&self, job: &MailJob) -> bool {
        let limit = self.policy.mail_per_address;
        if job.attempts > 1 || !limit.enabled() {
            return true;
        }
        let key = format!("mail:{}:{}", job.kind.as_str(), tokens::hash_token(&job.email));
        match self.store.hit_rate_limit(&key, limit, self.clock.now()).await {
            Ok(None) => true,
            Ok(Some(_)) => {
                tracing::info!(kind = ?job.kind, "mail not sent: its address had its share of this kind for now");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not count the address's mails; sending");
                true
            }
        }
    }

    async fn render_and_send(&self, job: &MailJob) -> anyhow::Result<()> {
        match self.render(job).await? {
            Some(mail) => deliver(self.mailer.as_ref(), &self.from, mail).await,
            None => Ok(()),
        }
    }

    /// The mail to send, after issuing what it carries; `None` when the account does
    /// not qualify (unknown, verified, inactive, deleted) and nothing is sent.
    async fn render(&self, job: &MailJob) -> anyhow::Result<Option<Mail>> {
        let p = &self.policy;
        let now = self.clock.now();
        Ok(match job.kind {
            MailKind::AlreadyRegistered => {
                if !self.within_address_limit(job).await {
                    return Ok(None);
                }
                Some(templates::already_registered(&job.email, &p.public_url))
            }
            // The notice of a changed password always goes.
            MailKind::PasswordChanged => Some(templates::password_changed(&job.email)),
            MailKind::Verification => {
                let Some(user) = self.store.user_by_email(&job.email).await? else { return Ok(None) };
                if user.email_verified() || user.status != Status::Active || !self.within_address_limit(job).await {
                    return Ok(None);
                }
                let (link, code) = (tokens::new_link_token(), tokens::new_code());
                let link_row = NewOneTimeToken {
                    id: Uuid::now_v7(),
                    token_hash: tokens::hash_token(&link),
                    expires_at: now + i64::from(p.verify_link_ttl),
                };
                let code_id = Uuid::now_v7();
                let code_row = NewOneTimeToken {
                    id: code_id,
                    token_hash: tokens::hash_code(&code_id.to_string(), &code),
                    expires_at: now + i64::from(p.verify_code_ttl),
                };
                self.store.issue_verification(user.id, &link_row, &code_row, now).await?;
                Some(templates::verification(
                    &user.email,
                    &p.public_url,
                    &link,
                    &code,
                    p.verify_link_ttl / 3600,
                    p.verify_code_ttl / 60,
                ))
            }
            MailKind::Reset => {
                let Some(user) = self.store.user_by_email(&job.email).await? else { return Ok(None) };
                if user.status == Status::Deleted || !self.within_address_limit(job).await {
                    return Ok(None);
                }
                let token = tokens::new_link_token();
                let row = NewOneTimeToken {
                    id: Uuid::now_v7(),
                    token_hash: tokens::hash_token(&token),
                    expires_at: now + i64::from(p.reset_ttl),
                };
                self.store.issue_reset(user.id, &row, now).await?;
                Some(templates::password_reset(&user.email, &p.public_url, &token, p.reset_ttl / 60))
            }
        })
    }
}
