//! Request path normalization (RFC 3986 §6.2.2), offered per listener as Envoy's
//! `normalize_path` and `merge_slashes`, so that `/%61dmin`, `/./admin`, `/x/../admin` and
//! `//admin` cannot slip past a route on `/admin`.

/// The normalized form of `path`, or `None` when it is already normal. `normalize`:
/// percent-encoded unreserved characters are decoded, other escapes get upper-case hex, and
/// `.` and `..` segments are removed. `merge_slashes`: runs of `/` become one.
pub fn normalize(path: &str, normalize: bool, merge_slashes: bool) -> Option<String> {
    let mut out = if normalize {
        remove_dot_segments(&decode_unreserved(path))
    } else {
        path.to_string()
    };
    if merge_slashes {
        let mut merged = String::with_capacity(out.len());
        for c in out.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        out = merged;
    }
    (out != path).then_some(out)
}

/// Whether `path` could change under [`normalize`]: the common clean path costs one scan.
pub fn may_change(path: &str) -> bool {
    path.contains(['%', '.']) || path.contains("//")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = &path[i + 1..i + 3];
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                if is_unreserved(b) {
                    out.push(b as char);
                } else {
                    out.push('%');
                    out.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        // A request path is ASCII (hyper rejects anything else), so bytes are chars.
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// RFC 3986 §5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." | ".." => {
                if *segment == ".." && output.len() > 1 {
                    output.pop();
                }
                // A trailing dot segment leaves the path ending in `/`.
                if i == last {
                    output.push("");
                }
            }
            s => output.push(s),
        }
    }
    let joined = output.join("/");
    if path.starts_with('/') && !joined.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(path: &str, n: bool, m: bool) -> String {
        normalize(path, n, m).unwrap_or_else(|| path.to_string())
    }

    #[test]
    fn dot_segments_and_unreserved_escapes_are_normalized() {
        assert_eq!(norm("/%61dmin", true, false), "/admin");
        assert_eq!(norm("/./admin", true, false), "/admin");
        assert_eq!(norm("/x/../admin", true, false), "/admin");
        assert_eq!(norm("/%2e%2e/admin", true, false), "/admin");
        assert_eq!(norm("/../../admin", true, false), "/admin");
        assert_eq!(norm("/a/./b/../c/", true, false), "/a/c/");
        assert_eq!(norm("/a/b/..", true, false), "/a/");
        assert_eq!(norm("/a/.", true, false), "/a/");
        // Reserved characters stay encoded, with upper-case hex; a bad escape stays as is.
        assert_eq!(norm("/a%2fb", true, false), "/a%2Fb");
        assert_eq!(norm("/a%zz", true, false), "/a%zz");
        assert_eq!(norm("/a%4", true, false), "/a%4");
        assert_eq!(normalize("/clean/path", true, true), None);
        // Without merge_slashes, empty segments stay.
        assert_eq!(norm("//admin", true, false), "//admin");
    }

    #[test]
    fn slashes_merge_only_when_asked() {
        assert_eq!(norm("//admin", false, true), "/admin");
        assert_eq!(norm("/a///b//", false, true), "/a/b/");
        assert_eq!(norm("/x/..//admin", true, true), "/admin");
        assert_eq!(normalize("/./a", false, true), None);
    }

    #[test]
    fn clean_paths_are_recognised_cheaply() {
        assert!(!may_change("/api/v1/users"));
        assert!(may_change("/api/./v1"));
        assert!(may_change("/api%2F"));
        assert!(may_change("//api"));
    }
}
