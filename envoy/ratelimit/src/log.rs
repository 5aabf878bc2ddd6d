//! One line per event on stderr: `<unix time> <level> <message>`. Debug lines only with
//! `JAIROUTER_RATELIMIT_LOG=debug`.

use std::fmt::Arguments;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn init_from_env() {
    let debug =
        std::env::var("JAIROUTER_RATELIMIT_LOG").is_ok_and(|v| v.eq_ignore_ascii_case("debug"));
    DEBUG.store(debug, Ordering::Relaxed);
}

fn line(level: &str, args: Arguments<'_>) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "{}.{:03} {level} {args}",
        t.as_secs(),
        t.subsec_millis()
    );
}

pub fn info(args: Arguments<'_>) {
    line("INFO", args);
}

pub fn warn(args: Arguments<'_>) {
    line("WARN", args);
}

pub fn error(args: Arguments<'_>) {
    line("ERROR", args);
}

pub fn debug(args: Arguments<'_>) {
    if DEBUG.load(Ordering::Relaxed) {
        line("DEBUG", args);
    }
}
