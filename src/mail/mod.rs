//! Outgoing mail: the texts, and the transports (one `.eml` file per mail, SMTP, or a
//! log line). What to send is queued durably in the database and worked off in the
//! background by `service::mail_jobs`, so a slow or broken mail server never delays a
//! response, changes its content or loses an account.

pub mod templates;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use crate::config::{MailTransport, Settings};

/// A mail to send: plain ASCII text.
#[derive(Clone)]
pub struct Mail {
    /// Recipient address.
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// Body text.
    pub body: String,
}

impl std::fmt::Debug for Mail {
    // Bodies hold tokens and codes: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mail").field("subject", &self.subject).finish_non_exhaustive()
    }
}

/// Delivers rendered messages.
#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    /// Sends one message.
    async fn send(&self, msg: Message) -> anyhow::Result<()>;
}

/// Writes one RFC 5322 file per mail into a directory.
pub struct FileMailer {
    dir: PathBuf,
}

#[async_trait]
impl Mailer for FileMailer {
    async fn send(&self, msg: Message) -> anyhow::Result<()> {
        tokio::fs::create_dir_all(&self.dir).await?;
        let name = format!("{}-{}.eml", chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"), uuid::Uuid::new_v4());
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut file = tokio::fs::File::create(&tmp).await?;
        tokio::io::AsyncWriteExt::write_all(&mut file, &msg.formatted()).await?;
        // On disk before the queue forgets the mail.
        file.sync_all().await?;
        // Rename is atomic: readers of the outbox never see half a mail.
        tokio::fs::rename(&tmp, self.dir.join(name)).await?;
        Ok(())
    }
}

/// Sends through an SMTP server.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, msg: Message) -> anyhow::Result<()> {
        self.transport.send(msg).await?;
        Ok(())
    }
}

/// Only logs that a mail was sent, never its content.
pub struct LogMailer;

#[async_trait]
impl Mailer for LogMailer {
    async fn send(&self, msg: Message) -> anyhow::Result<()> {
        let subject = msg.headers().get_raw("Subject").unwrap_or_default().to_owned();
        tracing::info!(subject, "mail not sent: the log transport is configured");
        Ok(())
    }
}

/// Builds the transport the settings ask for.
pub fn mailer_from(settings: &Settings) -> anyhow::Result<Arc<dyn Mailer>> {
    Ok(match settings.mail_transport {
        MailTransport::File => Arc::new(FileMailer { dir: settings.outbox_dir() }),
        MailTransport::Log => Arc::new(LogMailer),
        MailTransport::Smtp => {
            let url = settings.smtp_url.as_ref().map(|u| u.expose_secret().to_owned()).unwrap_or_default();
            let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
                .map_err(|_| {
                    anyhow::anyhow!("invalid settings: smtp_url (GATEHOUSE_SMTP_URL) is not a valid SMTP URL")
                })?
                .timeout(Some(Duration::from_secs(10)))
                .build();
            Arc::new(SmtpMailer { transport })
        }
    })
}

/// Plain 7-bit with CRLF line ends when the text allows (ASCII, lines within RFC 5322's
/// 998), so links and tokens reach the reader unwrapped; lettre would otherwise pick
/// quoted-printable for lines over 76 characters and split the links.
fn seven_bit(text: &str) -> Option<Body> {
    let ok = text.is_ascii() && !text.contains('\r') && !text.contains('\0') && text.lines().all(|l| l.len() <= 998);
    ok.then(|| Body::dangerous_pre_encoded(text.replace('\n', "\r\n").into_bytes(), ContentTransferEncoding::SevenBit))
}

/// The recipient's address cannot be written in a mail: no try will ever send it.
#[derive(Debug, thiserror::Error)]
#[error("the recipient address cannot be used")]
pub struct UnusableRecipient;

/// Builds and sends one mail, once; the mail queue (`service::mail_jobs`) retries,
/// unless the error is [`UnusableRecipient`].
pub async fn deliver(mailer: &dyn Mailer, from: &Mailbox, mail: Mail) -> anyhow::Result<()> {
    let to: Mailbox = mail.to.parse().map_err(|_| UnusableRecipient)?;
    let body = seven_bit(&mail.body).unwrap_or_else(|| Body::new(mail.body.clone()));
    // Named in the sender's domain: lettre's own would name this host. A retry renders
    // the mail anew, with fresh tokens, so each attempt is a message of its own.
    let message_id = format!("<{}@{}>", uuid::Uuid::new_v4().simple(), from.email.domain());
    let msg = Message::builder()
        .message_id(Some(message_id))
        .from(from.clone())
        .to(to)
        .subject(mail.subject.clone())
        .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(body))?;
    mailer.send(msg).await
}
