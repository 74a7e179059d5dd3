//! kmirror's own logs: to stderr, human-readable by default or one JSON object per line
//! (`--log-format json`), filtered by `KMIRROR_LOG` (a `RUST_LOG`-style filter, default
//! `warn`), coloured only when stderr is a terminal and `NO_COLOR` is unset.

use crate::cli::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

pub fn init(format: LogFormat) {
    let (filter, bad) = match std::env::var("KMIRROR_LOG") {
        Ok(spec) => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new("warn"), Some((spec, e))),
        },
        Err(_) => (EnvFilter::new("warn"), None),
    };
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    if let Some((spec, e)) = bad {
        tracing::warn!("KMIRROR_LOG={spec:?} is not a log filter ({e}); logging warnings only");
    }
}
