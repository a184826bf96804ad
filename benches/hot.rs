//! Criterion benches of the hot pure functions: `cargo bench --bench hot`.
#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse::crypto::jwt::{AccessTokens, SigningKey};
use gatehouse::crypto::tokens;
use gatehouse::domain::email::Email;
use gatehouse::domain::password;
use gatehouse::domain::user::{Role, Status, User};

fn user() -> User {
    User {
        id: uuid::Uuid::now_v7(),
        email: "bench@example.com".into(),
        name: None,
        password_hash: None,
        role: Role::User,
        status: Status::Active,
        email_verified_at: Some(0),
        created_at: 0,
        updated_at: 0,
        last_login_at: None,
        last_login_geolocation: None,
        metadata: serde_json::json!({}),
    }
}

fn access_tokens(c: &mut Criterion) {
    let key = SigningKey::generate(0).unwrap();
    let t = AccessTokens::new(&key, &[], "http://127.0.0.1:8080".into(), "gatehouse".into(), 3600).unwrap();
    let u = user();
    let sid = uuid::Uuid::now_v7();
    c.bench_function("access token: sign", |b| b.iter(|| t.issue(black_box(&u), sid, 1_000).unwrap()));
    c.bench_function("access token: verify, first sight (signature)", |b| {
        b.iter_batched(
            || t.issue(&u, sid, 1_000).unwrap().0,
            |jwt| t.verify(black_box(&jwt), 1_001).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let (jwt, _) = t.issue(&u, sid, 1_000).unwrap();
    t.verify(&jwt, 1_001).unwrap();
    c.bench_function("access token: verify, remembered", |b| b.iter(|| t.verify(black_box(&jwt), 1_001).unwrap()));
}

fn opaque_tokens(c: &mut Criterion) {
    let rt = tokens::new_refresh_token();
    c.bench_function("refresh token: new", |b| b.iter(tokens::new_refresh_token));
    c.bench_function("refresh token: hash", |b| b.iter(|| tokens::hash_token(black_box(&rt))));
    let next = tokens::new_refresh_token();
    c.bench_function("refresh token: seal successor", |b| b.iter(|| tokens::seal(black_box(&next), &rt)));
}

fn validation(c: &mut Criterion) {
    c.bench_function("validate: email", |b| {
        b.iter(|| Email::parse(black_box("  Some.Body+tag@Example.COM "), "email"))
    });
    c.bench_function("validate: new password", |b| {
        b.iter(|| password::check_new(black_box("correct horse battery staple"), Some("a@example.com"), "password"))
    });
    let body = br#"{"email": "someone@example.com", "password": "correct horse battery staple"}"#;
    c.bench_function("validate: login body to input", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(body)).unwrap();
            serde_path_to_error::deserialize::<_, gatehouse::service::accounts::LoginInput>(v).unwrap()
        })
    });
}

criterion_group!(benches, access_tokens, opaque_tokens, validation);
criterion_main!(benches);
