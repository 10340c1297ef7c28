//! The MongoDB connection and how its failures are sorted.
//!
//! Why this module exists: every MongoDB call of the service (user lookups, digest
//! reads and writes, readiness) must be bounded in time and must tell "MongoDB is
//! unreachable or slow, retry later" from "a unique index refused the write" (which
//! the digest store uses as its compare-and-swap signal).

use std::time::Duration;

use mongodb::bson::doc;
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

use crate::settings::MongoSettings;

/// Why a MongoDB operation failed.
pub use mongokit::StoreError;

/// Runs one MongoDB operation, failing with `Unavailable` if it takes longer than `timeout`.
pub use mongokit::bounded as with_timeout;

/// A client for `settings.uri` (connecting lazily, so a MongoDB that is down at start
/// is not an error) and the configured database.
pub async fn connect(settings: &MongoSettings) -> Result<(Client, Database), String> {
    let mut options =
        ClientOptions::parse(&settings.uri).await.map_err(|err| format!("MONGODB_URI is not usable: {err}"))?;
    options.server_selection_timeout = Some(settings.timeout);
    options.connect_timeout = Some(settings.timeout);
    options.app_name = Some("emailhandler".to_owned());
    let client = Client::with_options(options).map_err(|err| format!("cannot build the MongoDB client: {err}"))?;
    let database = client.database(&settings.database);
    Ok((client, database))
}

/// Readiness: MongoDB answers `ping`.
pub async fn ping(database: &Database, timeout: Duration) -> Result<(), String> {
    with_timeout(timeout, async { database.run_command(doc! { "ping": 1 }).await })
        .await
        .map(|_| ())
        .map_err(|err| err.to_string())
}
