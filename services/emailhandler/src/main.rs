//! emailhandler: turns chat messages (as digests) and purchase, payment and shipping
//! events into emails, in its own consumer group. See the library crate and
//! `docs/email.md`; this file only wires settings to the service kit.

use emailhandler::settings::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    servicekit::run("emailhandler", &Settings::env_map(), emailhandler::build).await
}
