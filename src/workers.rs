//! How many worker threads to run: the container's CPU quota (cgroup v2 `cpu.max`, v1
//! `cpu.cfs_quota_us`), else the cores this process may use.

use std::path::Path;

/// Worker threads to start when the config does not say.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match cgroup_quota(Path::new("/")) {
        Some(quota) => quota.min(cores),
        None => cores,
    }
}

/// The CPU quota, rounded up to whole CPUs, of the cgroup this process runs in. `root` is
/// the filesystem root (a test can point it elsewhere).
pub fn cgroup_quota(root: &Path) -> Option<usize> {
    let own = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    // cgroup v2: one line `0::/path`.
    let v2_path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    let base = root.join("sys/fs/cgroup");
    for dir in [base.join(v2_path.trim_start_matches('/')), base.clone()] {
        if let Ok(text) = std::fs::read_to_string(dir.join("cpu.max")) {
            return parse_cpu_max(&text);
        }
    }
    // cgroup v1.
    for dir in ["cpu", "cpu,cpuacct"] {
        let d = base.join(dir);
        let quota = std::fs::read_to_string(d.join("cpu.cfs_quota_us"));
        let period = std::fs::read_to_string(d.join("cpu.cfs_period_us"));
        if let (Ok(q), Ok(p)) = (quota, period) {
            let (q, p) = (q.trim().parse::<i64>().ok()?, p.trim().parse::<i64>().ok()?);
            return (q > 0 && p > 0).then(|| ((q + p - 1) / p) as usize);
        }
    }
    None
}

/// `max 100000` → none; `150000 100000` → 2.
fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?.parse::<u64>().ok()?;
    let period = parts.next().unwrap_or("100000").parse::<u64>().ok()?;
    (period > 0 && quota > 0).then(|| quota.div_ceil(period) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v2_and_v1_quotas() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(parse_cpu_max("50000 100000"), Some(1));

        let root = std::env::temp_dir().join(format!("remora-cg-{}", std::process::id()));
        let cg = root.join("sys/fs/cgroup/kubepods/pod1");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "0::/kubepods/pod1\n").unwrap();
        std::fs::write(cg.join("cpu.max"), "300000 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root), Some(3));

        std::fs::remove_file(cg.join("cpu.max")).unwrap();
        std::fs::remove_file(root.join("proc/self/cgroup")).unwrap();
        let v1 = root.join("sys/fs/cgroup/cpu");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "250000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(cgroup_quota(&root), Some(3));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
