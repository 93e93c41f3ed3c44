//! Request path normalization (RFC 3986 §6.2.2), offered per listener as Envoy's
//! `normalize_path` and `merge_slashes`, so that `/%61dmin`, `/./admin`, `/x/../admin`,
//! `/x\..\admin` and `//admin` cannot slip past a route on `/admin`.

/// A path that cannot be normalized safely: a `%` not followed by two hex digits (decoding
/// around it could make a new escape that was not in the request).
#[derive(Debug, PartialEq, Eq)]
pub struct BadEscape;

/// The normalized form of `path`, or `None` when it is already normal. `normalize`:
/// percent-encoded unreserved characters are decoded, other escapes get upper-case hex,
/// `\` becomes `/` (as browsers and Envoy read it), and `.` and `..` segments are removed.
/// `merge_slashes`: runs of `/` become one. Bytes outside ASCII are kept as they are. An
/// escape such as `%2F` stays encoded: what it means is the upstream's call.
pub fn normalize(
    path: &str,
    normalize: bool,
    merge_slashes: bool,
) -> Result<Option<String>, BadEscape> {
    let mut out = if normalize {
        remove_dot_segments(&decode_unreserved(path.as_bytes())?)
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
    Ok((out != path).then_some(out))
}

/// Whether `path` could change under [`normalize`]: the common clean path costs one scan.
pub fn may_change(path: &str) -> bool {
    path.contains(['%', '.', '\\']) || path.contains("//")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn decode_unreserved(path: &[u8]) -> Result<String, BadEscape> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    path.get(i + 1).copied().and_then(hex_value),
                    path.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(BadEscape);
                };
                let b = hi << 4 | lo;
                if is_unreserved(b) {
                    out.push(b);
                } else {
                    out.push(b'%');
                    out.extend(path[i + 1..i + 3].iter().map(u8::to_ascii_uppercase));
                }
                i += 3;
            }
            b'\\' => {
                out.push(b'/');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was replaced, and only by ASCII: valid UTF-8 in, valid UTF-8 out.
    String::from_utf8(out).map_err(|_| BadEscape)
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
        normalize(path, n, m)
            .unwrap()
            .unwrap_or_else(|| path.to_string())
    }

    #[test]
    fn dot_segments_and_unreserved_escapes_are_normalized() {
        assert_eq!(norm("/%61dmin", true, false), "/admin");
        assert_eq!(norm("/./admin", true, false), "/admin");
        assert_eq!(norm("/x/../admin", true, false), "/admin");
        assert_eq!(norm("/%2e%2e/admin", true, false), "/admin");
        assert_eq!(norm("/x\\..\\admin", true, false), "/admin");
        assert_eq!(norm("/../../admin", true, false), "/admin");
        assert_eq!(norm("/a/./b/../c/", true, false), "/a/c/");
        assert_eq!(norm("/a/b/..", true, false), "/a/");
        assert_eq!(norm("/a/.", true, false), "/a/");
        // Reserved characters stay encoded, with upper-case hex.
        assert_eq!(norm("/a%2fb", true, false), "/a%2Fb");
        assert_eq!(normalize("/clean/path", true, true), Ok(None));
        // Without merge_slashes, empty segments stay.
        assert_eq!(norm("//admin", true, false), "//admin");
        // Non-ASCII is kept as it is.
        assert_eq!(
            norm("/files/./caf\u{e9}.txt", true, false),
            "/files/caf\u{e9}.txt"
        );
    }

    #[test]
    fn an_escape_that_is_not_one_is_refused() {
        // Decoding around a stray `%` would make `%61` out of `%%36%31`.
        for bad in [
            "/%%36%31dmin",
            "/a%zz",
            "/a%4",
            "/%",
            "/%%",
            "/%a\u{e9}",
            "/%\u{e9}",
        ] {
            assert_eq!(normalize(bad, true, false), Err(BadEscape), "{bad}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing_more() {
        for path in [
            "/%61dmin",
            "/x/../%2e%2e/a%2fb/./c",
            "/a\\b/../c",
            "/%7e%41/..//x",
            "/caf\u{e9}/./x",
        ] {
            let once = norm(path, true, true);
            assert_eq!(norm(&once, true, true), once, "{path}");
        }
    }

    #[test]
    fn slashes_merge_only_when_asked() {
        assert_eq!(norm("//admin", false, true), "/admin");
        assert_eq!(norm("/a///b//", false, true), "/a/b/");
        assert_eq!(norm("/x/..//admin", true, true), "/admin");
        assert_eq!(normalize("/./a", false, true), Ok(None));
    }

    #[test]
    fn clean_paths_are_recognised_cheaply() {
        assert!(!may_change("/api/v1/users"));
        assert!(may_change("/api/./v1"));
        assert!(may_change("/api%2F"));
        assert!(may_change("//api"));
        assert!(may_change("/a\\b"));
    }
}
