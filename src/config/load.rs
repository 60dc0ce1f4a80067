//! Loading: built-in defaults, then the YAML file, then `FLOWMETRICS_*` environment
//! variables (`__` nests), layered by figment; then validation.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Yaml};
use figment::value::{Dict, Value};
use figment::Figment;

use super::error::{ConfigError, Invalid};
use super::report::{origin_of, read_errors};
use super::Config;
use crate::config_checks::check_config_file;

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "FLOWMETRICS_CONFIG";
const ENV_PREFIX: &str = "FLOWMETRICS_";

impl Config {
    /// Loads defaults, then `file` (if any), then the given environment variables.
    /// `env` is passed in (rather than read here) so tests can layer their own.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            check_config_file(path).map_err(|reason| ConfigError::File {
                path: path.to_path_buf(),
                reason,
            })?;
            figment = figment.merge(Yaml::file_exact(path));
        }
        let env_vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != CONFIG_ENV)
            .collect();
        figment = figment.merge(EnvVars(env_vars));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Unreadable(read_errors(e, &figment)))?;
        config
            .validate()
            .map_err(|Invalid { key, problem }| ConfigError::Invalid {
                origin: origin_of(&figment, &key),
                key,
                problem,
            })?;
        Ok(config)
    }

    /// Loads from the process environment: `--config`, else `FLOWMETRICS_CONFIG`.
    pub fn from_process_env(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let from_env = env
            .iter()
            .find(|(k, _)| k == CONFIG_ENV)
            .map(|(_, v)| PathBuf::from(v));
        let file = file.map(Path::to_path_buf).or(from_env);
        Config::load(file.as_deref(), env)
    }
}

/// `FLOWMETRICS_*` variables as a figment provider. Values are type-sniffed as figment's
/// own `Env` does (so `9464` arrives as a number); errors name the variable.
struct EnvVars(Vec<(String, String)>);

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable").interpolater(|_, keys| {
            let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("{ENV_PREFIX}{}", upper.join("__"))
        })
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, raw) in &self.0 {
            let path: Vec<String> = name[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_string)
                .collect();
            if path.iter().any(String::is_empty) {
                continue;
            }
            let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
            insert_nested(&mut root, &path, value);
        }
        Ok(figment::Profile::Default.collect(root))
    }
}

fn insert_nested(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [head, rest @ ..] => {
            let child = dict
                .entry(head.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if child.as_dict().is_none() {
                *child = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = child {
                insert_nested(inner, rest, value);
            }
        }
    }
}
