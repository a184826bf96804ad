//! The durable mail queue: enqueue, claim with a lease, retry, finish; claims are
//! exclusive across instances; registration queues exactly one mail either way.

use std::collections::HashSet;

use gatehouse::store::MailKind;

use crate::both_backends;
use crate::support::*;

both_backends!(
    a_queued_mail_is_claimed_once_per_lease_and_gone_when_finished,
    a_retried_mail_waits_until_its_time,
    simultaneous_claims_on_two_instances_take_each_mail_once,
    registration_queues_one_mail_whether_or_not_the_email_is_taken,
);

async fn a_queued_mail_is_claimed_once_per_lease_and_gone_when_finished(b: Backend) {
    let db = Db::new(b).await;
    db.store.enqueue_mail(MailKind::Reset, "q@example.test", T0).await.unwrap();
    let job = db.store.claim_mail_job(T0, 30).await.unwrap().expect("a due mail");
    assert_eq!((job.kind, job.email.as_str(), job.attempts), (MailKind::Reset, "q@example.test", 1));
    assert!(db.store.claim_mail_job(T0 + 29, 30).await.unwrap().is_none(), "leased");
    let again = db.store.claim_mail_job(T0 + 31, 30).await.unwrap().expect("the lease ran out");
    assert_eq!((again.id, again.attempts), (job.id, 2));
    // The first claim is no longer the holder: it can neither finish nor release it.
    db.store.finish_mail_job(job.id, job.lease).await.unwrap();
    db.store.retry_mail_job(job.id, job.lease, T0).await.unwrap();
    assert!(db.store.claim_mail_job(T0 + 40, 30).await.unwrap().is_none(), "still held by the second claim");
    db.store.finish_mail_job(again.id, again.lease).await.unwrap();
    assert!(db.store.claim_mail_job(T0 + 100, 30).await.unwrap().is_none());
}

async fn a_retried_mail_waits_until_its_time(b: Backend) {
    let db = Db::new(b).await;
    db.store.enqueue_mail(MailKind::PasswordChanged, "r@example.test", T0).await.unwrap();
    let job = db.store.claim_mail_job(T0, 30).await.unwrap().unwrap();
    db.store.retry_mail_job(job.id, job.lease, T0 + 10).await.unwrap();
    assert!(db.store.claim_mail_job(T0 + 9, 30).await.unwrap().is_none());
    assert_eq!(db.store.claim_mail_job(T0 + 10, 30).await.unwrap().unwrap().id, job.id);
}

async fn simultaneous_claims_on_two_instances_take_each_mail_once(b: Backend) {
    let db = Db::new(b).await;
    let other = db.another_instance().await;
    for i in 0..10 {
        db.store.enqueue_mail(MailKind::AlreadyRegistered, &format!("m{i}@example.test"), T0).await.unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..30 {
        let store = if i % 2 == 0 { db.store.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move { store.claim_mail_job(T0, 30).await.unwrap() }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        if let Some(job) = t.await.unwrap() {
            ids.push(job.id);
        }
    }
    assert_eq!(ids.len(), 10, "every mail claimed");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 10, "none claimed twice");
}

async fn registration_queues_one_mail_whether_or_not_the_email_is_taken(b: Backend) {
    let db = Db::new(b).await;
    assert!(db.store.register(new_user("new@example.test"), None, None).await.unwrap().is_some());
    let job = db.store.claim_mail_job(T0 + 1, 30).await.unwrap().unwrap();
    assert_eq!(job.kind, MailKind::Verification);
    db.store.finish_mail_job(job.id, job.lease).await.unwrap();
    assert!(db.store.register(new_user("new@example.test"), None, None).await.unwrap().is_none());
    let job = db.store.claim_mail_job(T0 + 1, 30).await.unwrap().unwrap();
    assert_eq!((job.kind, job.email.as_str()), (MailKind::AlreadyRegistered, "new@example.test"));
    db.store.finish_mail_job(job.id, job.lease).await.unwrap();
    assert!(db.store.claim_mail_job(T0 + 1, 30).await.unwrap().is_none(), "exactly one mail each time");
}
