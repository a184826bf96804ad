//! Users: roles, account states and the record the service works with.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::UnixTime;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An ordinary account.
    User,
    /// May use the admin API.
    Admin,
}

/// The state of an account; only `active` accounts can log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Normal.
    Active,
    /// Closed by its owner or an admin; may be reactivated.
    Deactivated,
    /// Blocked by an admin.
    Suspended,
    /// Soft-deleted: kept for the audit trail, never usable again.
    Deleted,
}

macro_rules! text_enum {
    ($t:ty { $($v:ident => $s:literal),* }) => {
        impl $t {
            /// The stored and serialised text.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($s => Ok(Self::$v),)* other => Err(format!("unknown value {other:?}")) }
            }
        }
    };
}
text_enum!(Role { User => "user", Admin => "admin" });
text_enum!(Status { Active => "active", Deactivated => "deactivated", Suspended => "suspended", Deleted => "deleted" });

/// A user as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// Stable id.
    pub id: Uuid,
    /// Normalised email.
    pub email: String,
    /// Display name.
    pub name: Option<String>,
    /// PHC string of the password hash; `None` for accounts without a password.
    pub password_hash: Option<String>,
    /// Role.
    pub role: Role,
    /// Account state.
    pub status: Status,
    /// When the email was verified.
    pub email_verified_at: Option<UnixTime>,
    /// Creation time.
    pub created_at: UnixTime,
    /// Last change.
    pub updated_at: UnixTime,
    /// Last successful login.
    pub last_login_at: Option<UnixTime>,
    /// Where the last login came from, if a GeoIP database is configured.
    pub last_login_geolocation: Option<serde_json::Value>,
    /// Free-form metadata set by admins.
    pub metadata: serde_json::Value,
}

impl User {
    /// Whether the email has been verified.
    pub fn email_verified(&self) -> bool {
        self.email_verified_at.is_some()
    }
}
