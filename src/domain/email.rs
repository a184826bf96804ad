//! Email addresses: trimmed and lowercased before any lookup, storage or counting,
//! and checked for a plausible shape (no attempt at full RFC 5321 syntax).

use super::FieldError;

/// A normalised, plausibly deliverable email address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// Normalises (trim, lowercase) and checks the shape.
    pub fn parse(raw: &str, field: &str) -> Result<Self, FieldError> {
        let e = normalise(raw);
        let bad = |msg: &str| FieldError::new(field, "invalid_email", msg);
        if e.is_empty() {
            return Err(FieldError::new(field, "required", "an email address is required"));
        }
        if e.len() > 254 {
            return Err(bad("an email address has at most 254 characters"));
        }
        let Some((local, domain)) = e.rsplit_once('@') else {
            return Err(bad("an email address needs an @"));
        };
        if local.is_empty() || local.len() > 64 {
            return Err(bad("the part before @ must have 1 to 64 characters"));
        }
        if e.chars().any(|c| c.is_whitespace() || c.is_control()) || local.chars().any(|c| "<>()[],;:\\\"@".contains(c))
        {
            return Err(bad("the address holds characters that are not allowed"));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2
            || labels.iter().any(|l| {
                l.is_empty()
                    || l.len() > 63
                    || l.starts_with('-')
                    || l.ends_with('-')
                    || !l.chars().all(|c| c.is_alphanumeric() || c == '-')
            })
        {
            return Err(bad("the domain after @ is not valid"));
        }
        Ok(Self(e))
    }

    /// [`Email::parse`] for an address to store (a new account): also one the mailer
    /// can address. What passes the shape check but not the mailer's parser (invisible
    /// and format characters such as U+200B or U+202E, a combining mark after an ASCII
    /// letter) would make an account that never gets its mail and can look like
    /// another. Lookups (login, resends, resets) keep the shape check alone, so an
    /// account stored before this check can still log in.
    pub fn parse_new(raw: &str, field: &str) -> Result<Self, FieldError> {
        let e = Self::parse(raw, field)?;
        if e.0.parse::<lettre::Address>().is_err() {
            return Err(FieldError::new(field, "invalid_email", "the address cannot receive mail as written"));
        }
        Ok(e)
    }

    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Trim and lowercase: the key for lookups and lockout counting.
pub fn normalise(raw: &str) -> String {
    raw.trim().to_lowercase()
}

impl std::fmt::Display for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lowercased() {
        assert_eq!(Email::parse("  Alice@Example.COM ", "email").unwrap().as_str(), "alice@example.com");
    }

    #[test]
    fn malformed_emails_are_rejected_with_a_code() {
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@example",
            "a b@example.com",
            "alice@exa_mple.com",
            "alice@-example.com",
            "alice@example..com",
        ] {
            let err = Email::parse(bad, "email").unwrap_err();
            assert!(err.code == "invalid_email" || err.code == "required", "{bad}: {err:?}");
            assert_eq!(err.field, "email");
        }
    }

    #[test]
    fn plus_addresses_and_subdomains_are_fine() {
        assert!(Email::parse("a.b+tag@mail.example.co.uk", "email").is_ok());
    }

    #[test]
    fn new_addresses_the_mailer_cannot_use_are_rejected_and_international_ones_kept() {
        // Each of these once made an account whose mail failed at every try.
        for bad in
            ["a\u{200b}@x.io", "\u{202e}a@x.io", "b\u{202e}@x.io", "\u{feff}d@x.io", "e\u{301}@x.io", "a\u{ad}b@x.io"]
        {
            assert!(Email::parse(bad, "email").is_ok(), "{bad:?} has the shape of an address, to look up");
            let err = Email::parse_new(bad, "email").unwrap_err();
            assert_eq!((err.field.as_str(), err.code.as_str()), ("email", "invalid_email"), "{bad:?}");
        }
        for good in ["üñí@exämple.com", "é@x.io", "a@xn--exmple-cua.com"] {
            let e = Email::parse_new(good, "email").unwrap_or_else(|err| panic!("{good}: {err:?}"));
            assert!(e.as_str().parse::<lettre::message::Mailbox>().is_ok(), "{good}");
        }
    }

    #[test]
    fn overlong_addresses_are_rejected() {
        let local = "a".repeat(65);
        assert!(Email::parse(&format!("{local}@example.com"), "email").is_err());
        let domain = format!("{}.com", "d".repeat(250));
        assert!(Email::parse(&format!("a@{domain}"), "email").is_err());
    }
}
