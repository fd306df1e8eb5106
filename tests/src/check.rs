//! Assertions the e2e tests and the demo share: Prometheus text, JSON access
//! logs, and waiting for an eventually-true condition.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Sum of the samples of `name` whose labels include every `(key, value)`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// JSON log lines (ztunnel's `LOG_FORMAT=json`) whose fields include every pair.
pub fn log_lines(log: &str, fields: &[(&str, &str)]) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            fields.iter().all(|(k, want)| match &v[*k] {
                serde_json::Value::String(s) => s == want,
                serde_json::Value::Null => false,
                serde_json::Value::Number(n) => n.to_string() == *want,
                serde_json::Value::Bool(b) => want.parse() == Ok(*b),
                _ => false,
            })
        })
        .collect()
}

/// Polls `f` until it returns `Ok(true)`, for at most `within`.
pub fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() > deadline {
            match last {
                Some(e) => bail!("{what}: not true after {within:?}; last error: {e:#}"),
                None => bail!("{what}: not true after {within:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Samples `f` every 200 ms until two samples in a row agree, and returns
/// that value: for counts that work still in flight may move, such as
/// copies a proxy sends on tasks of their own.
pub fn settled<T: PartialEq>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut last = f()?;
    eventually(what, within, || {
        std::thread::sleep(Duration::from_millis(200));
        let now = f()?;
        let same = now == last;
        last = now;
        Ok(same)
    })?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only samples with all the labels count, summed.
    #[test]
    fn sums_matching_series() {
        let text = "# TYPE x counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\nx_total{a=\"2\"} 100\ny_total{a=\"1\"} 9\n";
        assert_eq!(metric_sum(text, "x_total", &[("a", "1")]), 7.0);
        assert_eq!(metric_sum(text, "x_total", &[("a", "1"), ("b", "3")]), 4.0);
        assert_eq!(metric_sum(text, "x_total", &[("a", "9")]), 0.0);
    }
}
