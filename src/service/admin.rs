//! The admin use cases: list, read and change users, unlock logins, read the audit
//! trail. The caller's admin role is checked by the HTTP layer against the role stored
//! now, not the one in the token.

use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{Caller, Checks, ClientMeta, Error, Result, Services};
use crate::domain::user::{Role, Status, User};
use crate::domain::FieldError;
use crate::store::{Event, Patched, UserFilter, UserPatch};

/// Query of `GET /v1/admin/users`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserQuery {
    /// Part of the email.
    pub email: Option<String>,
    /// Exact state: active, deactivated, suspended, deleted.
    pub status: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Query of `GET /v1/admin/users/{id}/events`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Page size, 1 to 200 (default 200).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The largest page of the admin lists.
const MAX_PAGE: u32 = 200;

/// A page's size from its query (`default` when absent or empty), and its cursor.
fn page(limit: Option<String>, cursor: Option<String>, default: u32, c: &mut Checks) -> (u32, Option<Uuid>) {
    let limit = match limit.filter(|l| !l.is_empty()) {
        None => default,
        Some(l) => c
            .take(
                l.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| FieldError::new("limit", "out_of_range", "a whole number from 1 to 200")),
            )
            .unwrap_or(default),
    };
    let after = cursor.filter(|s| !s.is_empty()).and_then(|s| {
        c.take(Uuid::parse_str(&s).map_err(|_| FieldError::new("cursor", "invalid", "not a cursor of this list")))
    });
    (limit, after)
}

/// The first `limit` of `items` (fetched one more than a page) and, if there were more,
/// the cursor of the next page: the id of the page's last item.
fn split_page<T>(mut items: Vec<T>, limit: u32, id: impl Fn(&T) -> Uuid) -> (Vec<T>, Option<String>) {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        let next = items.last().map(|t| id(t).to_string());
        (items, next)
    } else {
        (items, None)
    }
}

/// `PATCH /v1/admin/users/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UserPatchInput {
    /// New state.
    #[schema(value_type = Option<Status>)]
    pub status: Option<serde_json::Value>,
    /// New role.
    #[schema(value_type = Option<Role>)]
    pub role: Option<serde_json::Value>,
    /// Verified or not.
    pub email_verified: Option<bool>,
    /// New display name; null clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    /// New metadata object (replaces the old one).
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

fn enum_field<T: std::str::FromStr>(v: Option<serde_json::Value>, field: &str, c: &mut Checks) -> Option<T> {
    let v = v?;
    match v.as_str().and_then(|s| s.parse().ok()) {
        Some(t) => Some(t),
        None => {
            c.push(FieldError::new(field, "invalid_value", format!("{v} is not an allowed {field}")));
            None
        }
    }
}

/// Largest metadata document, in bytes of JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

impl Services {
    /// A page of users and the cursor of the next.
    pub async fn admin_list_users(&self, q: UserQuery) -> Result<(Vec<User>, Option<String>)> {
        let mut c = Checks::default();
        let status = q.status.filter(|s| !s.is_empty()).and_then(|s| {
            c.take(s.parse::<Status>().map_err(|_| FieldError::new("status", "invalid_value", "not an account state")))
        });
        let (limit, after) = page(q.limit, q.cursor, 50, &mut c);
        if q.email.as_ref().is_some_and(|e| e.chars().any(char::is_control)) {
            c.push(FieldError::new("email", "invalid_characters", "control characters are not allowed"));
        }
        c.finish()?;
        let email = q.email.map(|e| e.trim().to_lowercase()).filter(|e| !e.is_empty());
        let users = self.store.list_users(&UserFilter { email, status, limit: limit + 1, after }).await?;
        Ok(split_page(users, limit, |u| u.id))
    }

    /// One user.
    pub async fn admin_user(&self, id: Uuid) -> Result<User> {
        self.store.user_by_id(id).await?.ok_or(Error::NotFound)
    }

    /// Changes a user; a state other than active ends their sessions. A change that
    /// would leave no admin able to act (active, verified) is refused (the service could not be run from its
    /// API any more).
    pub async fn admin_patch_user(
        &self,
        admin: &Caller,
        id: Uuid,
        input: UserPatchInput,
        meta: &ClientMeta,
    ) -> Result<User> {
        let mut c = Checks::default();
        let status = enum_field::<Status>(input.status, "status", &mut c);
        let role = enum_field::<Role>(input.role, "role", &mut c);
        let name = match input.name {
            Some(Some(n)) if n.chars().any(char::is_control) => {
                c.push(FieldError::new("name", "invalid_characters", "control characters are not allowed"));
                None
            }
            Some(Some(n)) if n.chars().count() > 200 => {
                c.push(FieldError::new("name", "too_long", "use at most 200 characters"));
                None
            }
            Some(Some(n)) => Some(Some(n.trim().to_owned()).filter(|n| !n.is_empty())),
            other => other,
        };
        if let Some(m) = &input.metadata {
            if !m.is_object() {
                c.push(FieldError::new("metadata", "invalid_type", "metadata must be an object"));
            } else if m.to_string().len() > MAX_METADATA_BYTES {
                c.push(FieldError::new("metadata", "too_long", "metadata is limited to 16 KiB"));
            }
        }
        c.finish()?;
        let patch = UserPatch { status, role, email_verified: input.email_verified, name, metadata: input.metadata };
        let (user, ended) = match self.store.patch_user(id, &patch, self.now()).await? {
            Patched::Changed(user, ended) => (*user, ended),
            Patched::NotFound => return Err(Error::NotFound),
            Patched::LastAdmin => return Err(Error::LastAdmin),
        };
        let reason = status.map(|s| format!("account_{}", s.as_str())).unwrap_or_default();
        self.audit(
            Some(&user),
            None,
            "account_updated",
            Some(meta),
            serde_json::json!({"by": admin.user.id, "status": status.map(Status::as_str), "role": role.map(Role::as_str)}),
        )
        .await;
        self.audit_ended(&user, &ended, &reason, Some(meta)).await;
        Ok(user)
    }

    /// Clears the lockout of the user's email, the hard lock too.
    pub async fn admin_unlock(&self, admin: &Caller, id: Uuid, meta: &ClientMeta) -> Result<()> {
        let user = self.store.user_by_id(id).await?.ok_or(Error::NotFound)?;
        self.store.unlock_login(&user.email, self.now()).await?;
        self.audit(Some(&user), None, "unlocked", Some(meta), serde_json::json!({"by": admin.user.id})).await;
        Ok(())
    }

    /// A page of the user's audit events, newest first (the latest 200 by default), and
    /// the cursor of the next (older) page.
    pub async fn admin_events(&self, id: Uuid, q: EventQuery) -> Result<(Vec<Event>, Option<String>)> {
        let mut c = Checks::default();
        let (limit, before) = page(q.limit, q.cursor, MAX_PAGE, &mut c);
        c.finish()?;
        self.store.user_by_id(id).await?.ok_or(Error::NotFound)?;
        let events = self.store.events_page(id, limit + 1, before).await?;
        let (events, next) = split_page(events, limit, |(id, _)| *id);
        Ok((events.into_iter().map(|(_, e)| e).collect(), next))
    }
}
