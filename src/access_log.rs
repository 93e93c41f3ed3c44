//! Optional per-listener access log: one JSON object per line, written by a background task
//! so that a slow disk never stalls a request (lines are dropped, and counted, if it falls behind).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::mpsc;

/// Lines buffered before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// One request, as logged.
#[derive(Debug, Default, Serialize)]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    /// Response body bytes sent to the client.
    pub bytes_sent: u64,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub upstream: Option<String>,
    pub request_id: Option<String>,
    /// The `x-remora-error` marker, when remora answered itself.
    pub error: Option<&'static str>,
}

/// A handle for writing lines to one log file.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens (appends to) `path` and starts its writer.
    pub fn open(path: &Path) -> std::io::Result<AccessLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let path = path.display().to_string();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Some(line) = rx.blocking_recv() {
                    let mut ok = out.write_all(&line).is_ok();
                    // Flush when the queue is drained, so lines appear promptly when idle.
                    if rx.is_empty() {
                        ok &= out.flush().is_ok();
                    }
                    if !ok {
                        tracing::warn!(%path, "access log write failed");
                    }
                }
            })?;
        Ok(AccessLog {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn write(&self, entry: &Entry) {
        let mut line = serde_json::to_vec(entry).expect("entry serializes");
        line.push(b'\n');
        if self.tx.try_send(line).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(dropped = n + 1, "access log is behind; dropping lines");
            }
        }
    }
}

/// `SystemTime` as RFC 3339 UTC with milliseconds, e.g. `2026-11-26T06:22:57.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_674_177_123);
        assert_eq!(rfc3339(t), "2026-11-26T06:22:57.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
