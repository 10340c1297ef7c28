//! Who gets an email: the `users` collection, read tolerantly.
//!
//! Why this module exists: the users collection belongs to another part of the
//! product, so its documents are read defensively. A missing user, a missing or
//! malformed address, or a user who did not opt in is not an error to retry but a
//! reason to skip (counted under `emails_skipped_total{reason}`). `email_opt_in` is
//! read as a boolean *or a number*, because the local MongoDB stand-in (nx-27017)
//! stores booleans written through `$set` as 1/0 integers; anything else (missing,
//! null, a string) counts as "not opted in": no consent, no email.

use std::future::IntoFuture;
use std::time::Duration;

use chatstream::UserId;
use lettre::message::Mailbox;
use lettre::Address;
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Collection, IndexModel};

use crate::store::{with_timeout, StoreError};

/// Someone an email can go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub user_id: String,
    pub display_name: String,
    pub address: Address,
    /// A BCP 47-ish tag (`de`, `pt-BR`), only letters, digits and `-`.
    pub locale: Option<String>,
}

impl Recipient {
    pub fn mailbox(&self) -> Mailbox {
        Mailbox::new(Some(self.display_name.clone()), self.address.clone())
    }
}

/// The answer of a lookup: a recipient, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Recipient),
    Skip(SkipReason),
}

/// Why a user gets no email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    UnknownUser,
    NoEmail,
    InvalidEmail,
    OptedOut,
}

impl SkipReason {
    /// The `reason` label of `emails_skipped_total`.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::UnknownUser => "unknown_user",
            SkipReason::NoEmail => "no_email",
            SkipReason::InvalidEmail => "invalid_email",
            SkipReason::OptedOut => "opted_out",
        }
    }
}

/// Read-only access to the users collection.
#[derive(Clone)]
pub struct UserDirectory {
    users: Collection<Document>,
    timeout: Duration,
}

impl UserDirectory {
    pub fn new(users: Collection<Document>, timeout: Duration) -> Self {
        Self { users, timeout }
    }

    /// Creates a (non-unique) index on `user_id` if it is missing; the collection is
    /// not ours, so failing here is only logged.
    pub async fn ensure_index(&self) {
        let index = IndexModel::builder().keys(doc! { "user_id": 1 }).build();
        if let Err(err) = with_timeout(self.timeout, self.users.create_index(index).into_future()).await {
            tracing::warn!(error = %err, "could not create the users.user_id index; lookups may be slow");
        }
    }

    async fn find(&self, user: &UserId) -> Result<Option<Document>, StoreError> {
        // `$eq` rather than a bare value: see chatpersistence's store (nx-27017 turns a
        // bare value into a query that cannot use the index).
        let filter = doc! { "user_id": { "$eq": user.as_str() } };
        with_timeout(self.timeout, self.users.find_one(filter).into_future()).await
    }

    /// Looks `user` up and decides whether they can be emailed.
    pub async fn recipient(&self, user: &UserId) -> Result<Lookup, StoreError> {
        Ok(match self.find(user).await? {
            None => Lookup::Skip(SkipReason::UnknownUser),
            Some(document) => recipient_from(user, &document),
        })
    }

    /// The display name of `user`, or the user id when there is none or the lookup
    /// fails (a name is nice to have, never a reason to hold an email back).
    pub async fn display_name(&self, user: &UserId) -> String {
        match self.find(user).await {
            Ok(Some(document)) => display_name(user, &document),
            Ok(None) => user.as_str().to_owned(),
            Err(err) => {
                tracing::debug!(user = %user, error = %err, "display name lookup failed; using the user id");
                user.as_str().to_owned()
            }
        }
    }
}

/// Decides from a user document (pure, so it is tested without a server).
pub fn recipient_from(user: &UserId, document: &Document) -> Lookup {
    if !opted_in(document.get("email_opt_in")) {
        return Lookup::Skip(SkipReason::OptedOut);
    }
    let email = match document.get("email") {
        Some(Bson::String(email)) if !email.trim().is_empty() => email.trim(),
        _ => return Lookup::Skip(SkipReason::NoEmail),
    };
    let Ok(address) = email.parse::<Address>() else {
        return Lookup::Skip(SkipReason::InvalidEmail);
    };
    Lookup::Found(Recipient {
        user_id: user.as_str().to_owned(),
        display_name: display_name(user, document),
        address,
        locale: document.get_str("locale").ok().and_then(clean_locale),
    })
}

/// `true`, or a number other than 0 (nx-27017 stores `$set` booleans as 1/0).
pub fn opted_in(value: Option<&Bson>) -> bool {
    match value {
        Some(Bson::Boolean(flag)) => *flag,
        Some(Bson::Int32(n)) => *n != 0,
        Some(Bson::Int64(n)) => *n != 0,
        Some(Bson::Double(n)) => *n != 0.0,
        _ => false,
    }
}

/// The name to greet and to put in `To`: printable, one line, at most 100 characters.
fn display_name(user: &UserId, document: &Document) -> String {
    let name: String = document
        .get_str("display_name")
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(100)
        .collect();
    if name.is_empty() {
        user.as_str().to_owned()
    } else {
        name
    }
}

/// A locale tag safe to use in a template path, or none.
fn clean_locale(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let ok = (1..=16).contains(&raw.len())
        && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && raw.bytes().next().is_some_and(|b| b.is_ascii_alphabetic());
    ok.then(|| raw.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> UserId {
        UserId::parse(id).expect("valid")
    }

    #[test]
    fn opt_in_accepts_booleans_and_numbers_only() {
        assert!(opted_in(Some(&Bson::Boolean(true))));
        assert!(opted_in(Some(&Bson::Int32(1))));
        assert!(opted_in(Some(&Bson::Int64(1))));
        assert!(opted_in(Some(&Bson::Double(1.0))));
        for no in [Bson::Boolean(false), Bson::Int32(0), Bson::Int64(0), Bson::Null, Bson::String("true".into())] {
            assert!(!opted_in(Some(&no)), "{no:?}");
        }
        assert!(!opted_in(None), "no answer means no consent");
    }

    #[test]
    fn documents_become_recipients_or_reasons() {
        let bob = user("bob");
        let found = recipient_from(
            &bob,
            &doc! {"user_id": "bob", "email": " bob@example.com ", "display_name": "Bob\n Builder", "email_opt_in": 1, "locale": "pt_BR"},
        );
        let Lookup::Found(r) = found else { panic!("{found:?}") };
        assert_eq!(r.address.to_string(), "bob@example.com");
        assert_eq!(r.display_name, "Bob Builder");
        assert_eq!(r.locale.as_deref(), Some("pt-BR"));

        let cases = [
            (doc! {"email": "b@example.com", "email_opt_in": false}, SkipReason::OptedOut),
            (doc! {"email": "b@example.com"}, SkipReason::OptedOut),
            (doc! {"email_opt_in": true}, SkipReason::NoEmail),
            (doc! {"email": "  ", "email_opt_in": true}, SkipReason::NoEmail),
            (doc! {"email": "not an address", "email_opt_in": true}, SkipReason::InvalidEmail),
        ];
        for (document, reason) in cases {
            assert_eq!(recipient_from(&bob, &document), Lookup::Skip(reason), "{document}");
        }
    }

    #[test]
    fn names_and_locales_are_cleaned() {
        let bob = user("bob");
        let Lookup::Found(r) =
            recipient_from(&bob, &doc! {"email": "b@example.com", "email_opt_in": true, "locale": "../../etc"})
        else {
            panic!("found")
        };
        assert_eq!(r.display_name, "bob", "no display name: the user id");
        assert_eq!(r.locale, None, "a path is not a locale");
    }
}
