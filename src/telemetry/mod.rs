//! Logging: `tracing` to stderr, as text or JSON lines; and the OpenTelemetry SDK behind
//! [`crate::metrics`] ([`Telemetry`]).

mod decision_logs;
mod meters;

use tracing_subscriber::EnvFilter;

pub use meters::Telemetry;

use crate::config::LogConfig;

/// Install the global subscriber; `RUST_LOG` overrides the configured level. Calling it twice
/// (tests) keeps the first subscriber.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    init_filter(cfg, filter);
}

/// [`init`] with the configured level over `RUST_LOG` (`mandate serve --log-level`).
pub fn init_over_rust_log(cfg: &LogConfig) {
    init_filter(
        cfg,
        EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")),
    );
}

fn init_filter(cfg: &LogConfig, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // On a write failure tracing-subscriber would report it with `eprintln!`, which
        // panics when stderr itself is the broken pipe: a closed log pipe must not kill the
        // sidecar.
        .log_internal_errors(false);
    let _ = if cfg.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
