//! Checks made before the configuration is read or used: the config file must be a
//! bounded regular file, and a log filter must mean what it seems to.

use std::path::Path;

/// A config file larger than this is refused before it is read: real ones are a few KiB.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Why a config file is not read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// No file at the path.
    #[error("does not exist")]
    Missing,
    /// The file exists but cannot be opened or examined.
    #[error("cannot open it: {0}")]
    Open(std::io::Error),
    /// A FIFO, device, socket or directory.
    #[error("is not a regular file (a FIFO, device, socket or directory)")]
    NotRegular,
    /// Larger than [`MAX_CONFIG_FILE_BYTES`].
    #[error("is larger than {MAX_CONFIG_FILE_BYTES} bytes")]
    TooLarge,
}

/// The file must be a regular file of bounded size before figment reads it: a FIFO
/// would block the start, `/dev/zero` would be read without end. Opened non-blocking
/// (a FIFO with no writer cannot block the open) and checked with fstat.
pub fn check_config_file(path: &Path) -> Result<(), ConfigFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ConfigFileError::Missing,
            _ => ConfigFileError::Open(e),
        })?;
    let meta = file.metadata().map_err(ConfigFileError::Open)?;
    if !meta.is_file() {
        return Err(ConfigFileError::NotRegular);
    }
    if meta.len() > MAX_CONFIG_FILE_BYTES {
        return Err(ConfigFileError::TooLarge);
    }
    Ok(())
}

/// Why a log filter (`log.level`, `RUST_LOG`) is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LogFilterError {
    /// The filter is empty or only white space.
    #[error("is empty")]
    Empty,
    /// A bare word that is not a level (`verbose`).
    #[error(
        "{0:?} is not a level (trace, debug, info, warn, error, off) nor a target=level \
         directive"
    )]
    NotALevel(String),
    /// `EnvFilter` refuses the filter: the filter, and what it said.
    #[error("{0:?} is not a filter: {1}")]
    Syntax(String, String),
}

/// A filter in tracing's `EnvFilter` syntax, with one strictness more: a bare word must
/// be a level. `EnvFilter` takes `verbose` as "everything from target `verbose`", which
/// turns off every line of this service, start errors included.
pub fn check_log_filter(spec: &str) -> Result<(), LogFilterError> {
    let directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(LogFilterError::Empty);
    }
    for d in &directives {
        let is_directive = d.contains('=') || d.contains('[');
        if !is_directive
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(LogFilterError::NotALevel((*d).to_string()));
        }
    }
    tracing_subscriber::EnvFilter::try_new(spec)
        .map(|_| ())
        .map_err(|e| LogFilterError::Syntax(spec.to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_word_must_be_a_level() {
        for ok in [
            "info",
            "WARN",
            "off",
            "info,hyper=warn",
            "flowmetrics[run]=trace",
            "3",
        ] {
            assert!(check_log_filter(ok).is_ok(), "{ok}");
        }
        assert!(matches!(
            check_log_filter("verbose"),
            Err(LogFilterError::NotALevel(_))
        ));
        assert!(matches!(
            check_log_filter("info,loud"),
            Err(LogFilterError::NotALevel(_))
        ));
        assert!(matches!(
            check_log_filter(" , "),
            Err(LogFilterError::Empty)
        ));
        assert!(matches!(
            check_log_filter("hyper=loud"),
            Err(LogFilterError::Syntax(..))
        ));
    }
}
