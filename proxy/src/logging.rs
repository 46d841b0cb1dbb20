//! Log set-up: text or JSON, level from NB_PROXY_LOG_LEVEL (RUST_LOG-style filters work too).

use tracing_subscriber::EnvFilter;

pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_new(level)
        .or_else(|_| EnvFilter::try_new("info"))
        .unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format.eq_ignore_ascii_case("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
