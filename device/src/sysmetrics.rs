//! Built-in system metrics, published every `telemetry.systemInterval` (5 s by default, like
//! seed 002's monitoring agent) as stream `system`, subtype `system_metrics`:
//!
//! ```json
//! {"cpu_percent": 12.5, "memory_percent": 41.0,
//!  "memory": {"total": 8233000000, "available": 4857000000, "used": 3376000000},
//!  "load": [0.31, 0.25, 0.2], "uptime_s": 86400.5,
//!  "disk_usage": [{"mount": "/", "total": 31000000000, "used": 9000000000, "percent": 29.0}],
//!  "network": [{"interface": "wwan0", "rx_bytes": 123, "tx_bytes": 456,
//!               "rx_bytes_per_s": 10.0, "tx_bytes_per_s": 20.0}]}
//! ```
//!
//! Read from `/proc` and `statvfs(3)`; a value the system does not offer is left out rather
//! than invented. CPU and network rates are over the interval since the previous sample (the
//! first sample has no rates).

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Map, Value, json};

/// Interface -> (received, sent) byte counters.
type NetCounters = BTreeMap<String, (u64, u64)>;

/// Samples system metrics; keeps the previous counters to compute rates.
#[derive(Debug, Default)]
pub struct SystemMetrics {
    cpu: Option<(u64, u64)>,
    net: Option<(Instant, NetCounters)>,
}

/// (busy, total) jiffies from the `cpu` line of /proc/stat.
fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// kB fields of /proc/meminfo, in bytes.
fn meminfo(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((k, kb * 1024))
        })
        .collect()
}

/// Interface -> (rx bytes, tx bytes) from /proc/net/dev, loopback left out.
fn net_counters(text: &str) -> NetCounters {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let f: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            Some((name.to_owned(), (*f.first()?, *f.get(8)?)))
        })
        .collect()
}

fn round(v: f64, places: i32) -> f64 {
    let p = 10f64.powi(places);
    (v * p).round() / p
}

impl SystemMetrics {
    /// One sample: the `data` of a `system_metrics` frame.
    pub fn sample(&mut self) -> Value {
        let mut out = Map::new();
        if let Some(now) = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(cpu_times) {
            if let Some(prev) = self.cpu {
                let (busy, total) = (now.0.saturating_sub(prev.0), now.1.saturating_sub(prev.1));
                if total > 0 {
                    out.insert("cpu_percent".into(), json!(round(100.0 * busy as f64 / total as f64, 1)));
                }
            }
            self.cpu = Some(now);
        }
        if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
            let m = meminfo(&text);
            if let (Some(&total), Some(&avail)) = (m.get("MemTotal"), m.get("MemAvailable"))
                && total > 0
            {
                out.insert("memory_percent".into(), json!(round(100.0 * (total - avail) as f64 / total as f64, 1)));
                out.insert("memory".into(), json!({"total": total, "available": avail, "used": total - avail}));
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/loadavg") {
            let l: Vec<f64> = text.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
            if l.len() == 3 {
                out.insert("load".into(), json!(l));
            }
        }
        if let Some(up) = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()))
        {
            out.insert("uptime_s".into(), json!(up));
        }
        if let Ok(s) = nix::sys::statvfs::statvfs("/") {
            let frsize = s.fragment_size();
            let total = s.blocks() * frsize;
            let free = s.blocks_available() * frsize;
            if total > 0 {
                let used = total.saturating_sub(s.blocks_free() * frsize);
                let percent = round(100.0 * used as f64 / (used + free).max(1) as f64, 1);
                out.insert(
                    "disk_usage".into(),
                    json!([{"mount": "/", "total": total, "used": used, "percent": percent}]),
                );
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/net/dev") {
            let now = Instant::now();
            let counters = net_counters(&text);
            let list: Vec<Value> = counters
                .iter()
                .map(|(name, &(rx, tx))| {
                    let mut o = json!({"interface": name, "rx_bytes": rx, "tx_bytes": tx});
                    if let Some((then, prev)) = &self.net {
                        let dt = now.duration_since(*then).as_secs_f64();
                        if let (Some(&(prx, ptx)), true) = (prev.get(name), dt > 0.0) {
                            o["rx_bytes_per_s"] = json!(round(rx.saturating_sub(prx) as f64 / dt, 1));
                            o["tx_bytes_per_s"] = json!(round(tx.saturating_sub(ptx) as f64 / dt, 1));
                        }
                    }
                    o
                })
                .collect();
            out.insert("network".into(), Value::Array(list));
            self.net = Some((now, counters));
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(cpu_times(stat), Some((200, 1000)));
        let m = meminfo("MemTotal:       1000 kB\nMemAvailable:    250 kB\n");
        assert_eq!(m["MemTotal"], 1_024_000);
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 100 2 0 0 0 0 0 0 200 3 0 0 0 0 0 0\n";
        let n = net_counters(dev);
        assert_eq!(n.len(), 1);
        assert_eq!(n["eth0"], (100, 200));
    }

    #[test]
    fn a_second_sample_has_rates() {
        let mut m = SystemMetrics::default();
        let first = m.sample();
        assert!(first.get("memory_percent").is_some(), "{first}");
        assert!(first.get("cpu_percent").is_none(), "no rate from one sample");
        std::thread::sleep(std::time::Duration::from_millis(250));
        let second = m.sample();
        let cpu = second["cpu_percent"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{second}");
        assert!(second["disk_usage"][0]["total"].as_u64().unwrap() > 0, "{second}");
    }
}
