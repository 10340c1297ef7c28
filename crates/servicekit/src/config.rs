//! Configuration: defaults in code, an optional file, environment overrides.
//!
//! Precedence, lowest first:
//! 1. the `Default` of the settings type (the documented defaults live in code);
//! 2. the file named by `CHATFLEET_CONFIG` (TOML, YAML or JSON by extension), if set;
//! 3. `CHATFLEET_<SECTION>__<KEY>` variables, for any setting at all;
//! 4. the flat, documented variable names (`MESSAGE_RETRY_MAX_RETRIES`, `REDIS_URL`,
//!    ...), mapped to settings through an [`EnvMap`]. These win because they are the
//!    names operators are told about in `docs/configuration.md`.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The environment variable naming an optional configuration file.
pub const CONFIG_FILE_VAR: &str = "CHATFLEET_CONFIG";

/// Why configuration could not be loaded. The message names the offending setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File { path: String, source: config::ConfigError },
    #[error("invalid configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    #[error("invalid value for {var}: {message}")]
    Value { var: String, message: String },
}

/// Maps documented environment variable names to settings keys (dotted paths).
#[derive(Debug, Clone, Default)]
pub struct EnvMap {
    entries: Vec<(String, String)>,
}

impl EnvMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// `env` overrides the setting at the dotted path `key`.
    pub fn var(mut self, env: &str, key: &str) -> Self {
        self.entries.push((env.to_owned(), key.to_owned()));
        self
    }

    /// Adds a section's own table of `(ENV_NAME, key)` pairs under `section`.
    /// An empty `section` maps the keys at the top level.
    pub fn section(mut self, section: &str, vars: &[(&str, &str)]) -> Self {
        for (env, key) in vars {
            let path = if section.is_empty() { (*key).to_owned() } else { format!("{section}.{key}") };
            self.entries.push(((*env).to_owned(), path));
        }
        self
    }

    /// Like [`EnvMap::section`], but every variable name gets `prefix` in front, so one
    /// section type can be used twice (for example two Kafka consumers).
    pub fn prefixed_section(mut self, prefix: &str, section: &str, vars: &[(&str, &str)]) -> Self {
        for (env, key) in vars {
            self.entries.push((format!("{prefix}{env}"), format!("{section}.{key}")));
        }
        self
    }

    pub fn merge(mut self, other: EnvMap) -> Self {
        self.entries.extend(other.entries);
        self
    }

    /// The documented variable names, in the order they were added.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(env, _)| env.as_str())
    }
}

/// Loads settings of type `T` from the process environment.
pub fn load<T>(env: &EnvMap) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    load_from(env, |name| std::env::var(name).ok())
}

/// A variable lookup over fixed `(name, value)` pairs, for [`load_from`] in tests.
pub fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: std::collections::HashMap<String, String> =
        vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |name| map.get(name).cloned()
}

/// Loads settings with a custom variable lookup (tests pass [`lookup`] instead of the
/// process environment).
pub fn load_from<T, F>(env: &EnvMap, lookup: F) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
    F: Fn(&str) -> Option<String>,
{
    let defaults = config::Config::try_from(&T::default())?;
    let mut builder = config::Config::builder().add_source(defaults);

    if let Some(path) = lookup(CONFIG_FILE_VAR).filter(|p| !p.is_empty()) {
        let file = config::File::with_name(&path).required(true);
        // Surface file problems with the file's name in front of them.
        config::Config::builder()
            .add_source(file.clone())
            .build()
            .map_err(|source| ConfigError::File { path: path.clone(), source })?;
        builder = builder.add_source(file);
    }

    for (name, value) in std::env::vars() {
        if name == CONFIG_FILE_VAR {
            continue;
        }
        if let Some(rest) = name.strip_prefix("CHATFLEET_") {
            builder = builder.set_override(rest.to_ascii_lowercase().replace("__", "."), value)?;
        }
    }

    for (var, key) in &env.entries {
        if let Some(value) = lookup(var) {
            builder = builder.set_override(key.as_str(), value)?;
        }
    }

    let merged = builder.build()?;
    merged.try_deserialize::<T>().map_err(|err| {
        // Name the documented variable when a mapped value failed to parse.
        let text = err.to_string();
        for (var, key) in &env.entries {
            if text.contains(key.as_str()) && lookup(var).is_some() {
                return ConfigError::Value { var: var.clone(), message: text };
            }
        }
        ConfigError::Invalid(err)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Retry {
        max_retries: u32,
        #[serde(with = "humantime_serde")]
        initial_interval: Duration,
        multiplier: f64,
    }

    impl Default for Retry {
        fn default() -> Self {
            Self { max_retries: 5, initial_interval: Duration::from_millis(100), multiplier: 2.0 }
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Settings {
        retry: Retry,
        name: String,
    }

    fn env_map() -> EnvMap {
        EnvMap::new()
            .section(
                "retry",
                &[
                    ("MESSAGE_RETRY_MAX_RETRIES", "max_retries"),
                    ("MESSAGE_RETRY_INITIAL_INTERVAL", "initial_interval"),
                    ("MESSAGE_RETRY_MULTIPLIER", "multiplier"),
                ],
            )
            .var("SERVICE_NAME", "name")
    }

    #[test]
    fn defaults_come_from_code() {
        let settings: Settings = load_from(&env_map(), lookup(&[])).expect("defaults load");
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn documented_variables_override_defaults() {
        let settings: Settings = load_from(
            &env_map(),
            lookup(&[
                ("MESSAGE_RETRY_MAX_RETRIES", "9"),
                ("MESSAGE_RETRY_INITIAL_INTERVAL", "250ms"),
                ("MESSAGE_RETRY_MULTIPLIER", "1.5"),
                ("SERVICE_NAME", "x"),
            ]),
        )
        .expect("overrides load");
        assert_eq!(settings.retry.max_retries, 9);
        assert_eq!(settings.retry.initial_interval, Duration::from_millis(250));
        assert_eq!(settings.retry.multiplier, 1.5);
        assert_eq!(settings.name, "x");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = load_from::<Settings, _>(&env_map(), lookup(&[("MESSAGE_RETRY_MAX_RETRIES", "many")]))
            .expect_err("not a number");
        assert!(err.to_string().contains("MESSAGE_RETRY_MAX_RETRIES"), "{err}");
    }

    #[test]
    fn a_file_sits_between_defaults_and_environment() {
        let dir = std::env::temp_dir().join(format!("servicekit-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("settings.toml");
        std::fs::write(&path, "name = \"from-file\"\n[retry]\nmax_retries = 7\nmultiplier = 3.0\n").expect("write");
        let path = path.to_string_lossy().into_owned();
        let settings: Settings =
            load_from(&env_map(), lookup(&[(CONFIG_FILE_VAR, path.as_str()), ("MESSAGE_RETRY_MULTIPLIER", "4.0")]))
                .expect("file loads");
        assert_eq!(settings.name, "from-file");
        assert_eq!(settings.retry.max_retries, 7);
        assert_eq!(settings.retry.multiplier, 4.0, "environment beats the file");
        assert_eq!(settings.retry.initial_interval, Duration::from_millis(100), "code default kept");
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = load_from::<Settings, _>(&env_map(), lookup(&[(CONFIG_FILE_VAR, "/nonexistent/chatfleet.toml")]))
            .expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/chatfleet.toml"), "{err}");
    }
}
