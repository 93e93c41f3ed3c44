//! Finds the virtual hosts of a config text as spans of lines, each keyed by a hash of its
//! text, so that a reload can re-read only the ones whose text changed (see `reuse`).
//!
//! Only the block style is split (`route_configs:` and `virtual_hosts:` with their items on
//! lines of their own); anything else, and any text that might make an item mean more than
//! its own lines (an anchor, a second document, a tab in the indentation), is not split, and
//! the whole text is read as usual.

use std::hash::{Hash, Hasher};
use std::ops::Range;

use super::raw::RawVirtualHost;

/// One virtual host's lines in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostItem {
    /// Which static route config (0-based, in text order) it belongs to.
    pub route_config: usize,
    /// Its place among that route config's virtual hosts.
    pub index: usize,
    /// Byte range of its lines, from its `- ` line to the line before the next item.
    pub range: Range<usize>,
    /// The column of its `-`.
    pub indent: usize,
    /// A hash of its text.
    pub key: u64,
}

/// The virtual hosts of a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// How many virtual hosts each route config has (block style only).
    pub counts: Vec<usize>,
    pub items: Vec<VhostItem>,
}

/// The key of an item's text: the same text, the same virtual host (no anchor can reach in).
pub fn key(item: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    "remora virtual host text".hash(&mut h);
    item.hash(&mut h);
    h.finish()
}

/// A line: where it starts and ends (without its newline), its indentation, and whether it
/// holds nothing but a comment or blanks.
struct Line<'a> {
    start: usize,
    text: &'a str,
    indent: usize,
    blank: bool,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for raw in text.split_inclusive('\n') {
        let line = raw.trim_end_matches(['\n', '\r']);
        let indent = line.len() - line.trim_start_matches(' ').len();
        let rest = line[indent..].trim_end();
        out.push(Line {
            start,
            text: line,
            indent,
            blank: rest.is_empty() || rest.starts_with('#'),
        });
        start += raw.len();
    }
    out
}

/// Whether a line (past its indentation) is the key `name` with nothing after it but blanks
/// or a comment: the start of a block.
fn opens_block(rest: &str, name: &str) -> bool {
    rest.strip_prefix(name)
        .and_then(|r| r.strip_prefix(':'))
        .is_some_and(|r| {
            let r = r.trim_start();
            r.is_empty() || r.starts_with('#')
        })
}

/// Whether a line (past its indentation) starts a sequence item.
fn is_item(rest: &str) -> bool {
    rest == "-" || rest.starts_with("- ")
}

/// The items of the block sequence whose first line is at `from` (skipping blank lines): each
/// as (first line, end line exclusive, indent). Stops at the first line that ends the
/// sequence; returns that line's index too.
fn sequence(
    lines: &[Line<'_>],
    from: usize,
    parent_indent: usize,
) -> (Vec<(usize, usize, usize)>, usize) {
    let mut i = from;
    while i < lines.len() && lines[i].blank {
        i += 1;
    }
    let mut items = Vec::new();
    let Some(first) = lines.get(i) else {
        return (items, i);
    };
    let indent = first.indent;
    if indent < parent_indent || !is_item(&first.text[indent..]) {
        return (items, i);
    }
    let mut current = i;
    i += 1;
    loop {
        let end = i >= lines.len()
            || (!lines[i].blank
                && (lines[i].indent < indent
                    || (lines[i].indent == indent && !is_item(&lines[i].text[indent..]))));
        if end {
            items.push((current, i, indent));
            return (items, i);
        }
        if !lines[i].blank && lines[i].indent == indent {
            items.push((current, i, indent));
            current = i;
        }
        i += 1;
    }
}

/// Splits `text` into its virtual hosts, or `None` when it is not all block style or might
/// not mean the same item by item.
pub fn virtual_hosts(text: &str) -> Option<Split> {
    // An anchor lets one item reach into another; tabs and document markers make the
    // indentation rules or the document bounds other than this reads them.
    if text.contains('&') || text.contains('\t') {
        return None;
    }
    let lines = lines(text);
    if lines.iter().any(|l| {
        l.indent == 0
            && (l.text.starts_with("---") || l.text.starts_with("...") || l.text.starts_with('%'))
    }) {
        return None;
    }
    let top = lines
        .iter()
        .position(|l| l.indent == 0 && !l.blank && opens_block(l.text, "route_configs"));
    let Some(top) = top else {
        // No block `route_configs:`: nothing to split, unless it is written another way.
        let other = lines
            .iter()
            .any(|l| l.indent == 0 && l.text.starts_with("route_configs"));
        return (!other).then(|| Split {
            counts: Vec::new(),
            items: Vec::new(),
        });
    };
    let (configs, _) = sequence(&lines, top + 1, 0);
    let mut split = Split {
        counts: Vec::with_capacity(configs.len()),
        items: Vec::new(),
    };
    for (rc, (first, end, dash)) in configs.into_iter().enumerate() {
        // The route config's keys sit two past its dash (`- name: x` then `  virtual_hosts:`).
        let keys = dash + 2;
        let at = (first..end).find(|&i| {
            let l = &lines[i];
            let rest = if i == first {
                l.text[dash..].strip_prefix("- ").map(str::trim_start)
            } else {
                (l.indent == keys).then(|| &l.text[keys..])
            };
            rest.is_some_and(|r| r.starts_with("virtual_hosts"))
        });
        let Some(at) = at else {
            split.counts.push(0);
            continue;
        };
        let line = &lines[at];
        if at == first || line.indent != keys || !opens_block(&line.text[keys..], "virtual_hosts") {
            return None;
        }
        let (vhosts, stop) = sequence(&lines[..end], at + 1, keys);
        if vhosts.is_empty() {
            return None;
        }
        // Whatever follows the sequence inside the route config must be one of its keys.
        if stop < end && lines[stop].indent != keys {
            return None;
        }
        split.counts.push(vhosts.len());
        for (index, (a, b, indent)) in vhosts.into_iter().enumerate() {
            let range = lines[a].start..lines.get(b).map_or(text.len(), |l| l.start);
            split.items.push(VhostItem {
                route_config: rc,
                index,
                key: key(&text[range.clone()]),
                range,
                indent,
            });
        }
    }
    Some(split)
}

/// The name a skeleton's stand-in for item `n` has.
fn marker(n: usize) -> String {
    format!("\u{1}remora item {n}")
}

/// `text` with every virtual host's lines replaced by a one-line stand-in, read; `None`
/// unless each stand-in reads as the virtual host the split says it is (then no item began
/// or ended inside a quoted scalar or a flow collection, where indentation is not checked).
pub fn skeleton(text: &str, split: &Split) -> Option<super::RawConfig> {
    let mut out = String::with_capacity(text.len() / 4);
    let mut at = 0;
    for (n, item) in split.items.iter().enumerate() {
        out.push_str(&text[at..item.range.start]);
        out.extend(std::iter::repeat_n(' ', item.indent));
        out.push_str(&format!(
            "- {{name: \"\\x01remora item {n}\", domains: []}}\n"
        ));
        at = item.range.end;
    }
    out.push_str(&text[at..]);
    let raw: super::RawConfig = serde_yaml_ng::from_str(&out).ok()?;
    let counts_agree = raw.route_configs.len() == split.counts.len()
        && raw
            .route_configs
            .iter()
            .zip(&split.counts)
            .all(|(rc, n)| rc.virtual_hosts.len() == *n);
    let in_place = counts_agree
        && split.items.iter().enumerate().all(|(n, item)| {
            let vh = &raw.route_configs[item.route_config].virtual_hosts[item.index];
            vh.name == marker(n) && vh.routes.is_empty()
        });
    in_place.then_some(raw)
}

/// One virtual host's lines read on their own, marked with their key.
pub fn read_alone(text: &str, item: &VhostItem) -> Option<RawVirtualHost> {
    read_lines(&text[item.range.clone()], item.key)
}

/// A virtual host's lines (a one-item block sequence) read on their own, marked with `key`.
pub fn read_lines(lines: &str, key: u64) -> Option<RawVirtualHost> {
    let mut one: Vec<RawVirtualHost> = serde_yaml_ng::from_str(lines).ok()?;
    if one.len() != 1 {
        return None;
    }
    let mut vh = one.pop()?;
    vh.read_from.text_key = Some(key);
    Some(vh)
}

/// Reads `text` item by item: the skeleton, then each virtual host on its own, so that each
/// is marked with the key of the text it was read from. `None` when the text does not split
/// or a piece does not read; the caller then reads it whole.
pub fn read_whole(text: &str) -> Option<super::RawConfig> {
    let split = virtual_hosts(text)?;
    let mut raw = skeleton(text, &split)?;
    for item in &split.items {
        raw.route_configs[item.route_config].virtual_hosts[item.index] = read_alone(text, item)?;
    }
    Some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(text: &str) -> Vec<String> {
        virtual_hosts(text)
            .expect("split")
            .items
            .iter()
            .map(|i| text[i.range.clone()].to_string())
            .collect()
    }

    #[test]
    fn splits_block_virtual_hosts_into_their_lines() {
        let text = "listeners: [{name: l, address: 127.0.0.1:1, route_config: r}]\n\
                    route_configs:\n\
                    \x20 - name: r\n\
                    \x20   virtual_hosts:\n\
                    \x20     - name: a\n\
                    \x20       domains: [a]\n\
                    \n\
                    \x20       # a comment\n\
                    \x20       routes: [{match: {prefix: /}, cluster: c}]\n\
                    \x20     - {name: b, domains: [b]}\n\
                    \x20   retry_policy: {}\n\
                    \x20 - name: s\n\
                    \x20   virtual_hosts:\n\
                    \x20   - name: c\n\
                    \x20     domains: [c]\n\
                    clusters: []\n";
        let split = virtual_hosts(text).unwrap();
        assert_eq!(split.counts, vec![2, 1]);
        assert_eq!(
            texts(text),
            vec![
                "      - name: a\n        domains: [a]\n\n        # a comment\n        routes: [{match: {prefix: /}, cluster: c}]\n",
                "      - {name: b, domains: [b]}\n",
                "    - name: c\n      domains: [c]\n",
            ]
        );
        assert_eq!(split.items[2].route_config, 1);
        assert_eq!(split.items[0].indent, 6);
    }

    #[test]
    fn does_not_split_what_it_cannot_read_item_by_item() {
        for text in [
            "route_configs: [{name: r, virtual_hosts: []}]\n",
            "route_configs:\n  - name: r\n    virtual_hosts: [{name: a, domains: [a]}]\n",
            "route_configs:\n  - name: r\n    virtual_hosts:\n      - &v {name: a, domains: [a]}\n",
            "route_configs:\n  - name: r\n    virtual_hosts:\n\t- {name: a, domains: [a]}\n",
            "---\nroute_configs:\n  - name: r\n    virtual_hosts:\n      - {name: a}\n",
            "route_configs:\n  - virtual_hosts:\n      - {name: a}\n",
        ] {
            assert_eq!(virtual_hosts(text), None, "{text}");
        }
        // No route configs at all: nothing to split, and that is an answer.
        assert_eq!(
            virtual_hosts("clusters: []\n").map(|s| s.items.len()),
            Some(0)
        );
    }
}
