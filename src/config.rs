//! Reading a config file: parse, check the schema, validate, and report every problem with
//! file:line:column, the field path and a did-you-mean.
//!
//! `remora validate`, startup and every reload go through [`load_file`] / [`parse`], so a
//! file that validates is a file that loads.

pub mod compile;
pub mod duration;
pub mod items;
pub mod locate;
pub mod raw;
pub mod reuse;
pub mod shown;
mod strict;
mod validate;
pub mod watch;
pub mod xds;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde_yaml_ng::Value;

use self::locate::{render_path, Pos, Seg, SourceMap};
pub use self::raw::RawConfig;
pub use self::validate::overlaps;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<embedded>`, `<xds>`) the config came from.
    pub file: String,
    /// Where in the file, when known.
    pub pos: Option<Pos>,
    /// The field path, e.g. `route_configs[0].virtual_hosts[1].routes[2].cluster`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// A likely intended spelling.
    pub did_you_mean: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(f, "{}:{}:{}: ", self.file, p.line, p.column)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.did_you_mean {
            write!(f, " (did you mean `{hint}`?)")?;
        }
        Ok(())
    }
}

/// Every problem found in one config file; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and checks a config file. Returns the parsed config and the text it came from.
pub fn load_file(path: &Path) -> Result<(RawConfig, String), ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            pos: None,
            path: String::new(),
            message: format!("cannot read config file: {e}"),
            did_you_mean: None,
        }])
    })?;
    let raw = parse(&text, &file)?;
    Ok((raw, text))
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<RawConfig, ConfigErrors> {
    parse_with(text, file, None)
}

/// Parses config text, adds the resources a control plane sent (`dynamic`), and validates
/// the whole: a name defined both ways is an error. Problems in dynamic resources are
/// reported as `<xds>` with the resource's name.
pub fn parse_with(
    text: &str,
    file: &str,
    dynamic: Option<&xds::Dynamic>,
) -> Result<RawConfig, ConfigErrors> {
    parse_checked(text, file, dynamic, validate::TlsFiles::Load)
}

/// Parses and validates a config the control plane serves: the TLS files it names are the
/// sidecars', so they are not read here (each sidecar NACKs what it cannot load).
pub fn parse_for_serving(text: &str, file: &str) -> Result<RawConfig, ConfigErrors> {
    parse_checked(text, file, None, validate::TlsFiles::NameOnly)
}

fn parse_checked(
    text: &str,
    file: &str,
    dynamic: Option<&xds::Dynamic>,
    files: validate::TlsFiles,
) -> Result<RawConfig, ConfigErrors> {
    let at = |pos: Option<Pos>, path: &[Seg], message: String, did_you_mean: Option<String>| {
        ConfigError {
            file: file.to_string(),
            pos,
            path: render_path(path),
            message,
            did_you_mean,
        }
    };
    let Read {
        raw,
        mut source,
        statics,
    } = read(text, dynamic, &at, files)?;
    let problems = validate::validate(&raw, statics[1], files);
    if problems.is_empty() {
        return Ok(raw);
    }
    // Which dynamic resource a problem is in, if it is in one.
    let from_xds = |path: &[Seg]| -> Option<String> {
        let (Some(Seg::Key(list)), Some(Seg::Index(i))) = (path.first(), path.get(1)) else {
            return None;
        };
        let (kind, name) = match list.as_str() {
            "listeners" if *i >= statics[0] => ("listener", &raw.listeners[*i].name),
            "route_configs" if *i >= statics[1] => ("route config", &raw.route_configs[*i].name),
            "clusters" if *i >= statics[2] => ("cluster", &raw.clusters[*i].name),
            _ => return None,
        };
        Some(format!("{kind} `{name}`"))
    };
    Err(ConfigErrors(
        problems
            .into_iter()
            .map(|p| match from_xds(&p.path) {
                Some(resource) => ConfigError {
                    file: "<xds>".into(),
                    pos: None,
                    path: render_path(&p.path),
                    message: format!("{resource}: {}", p.message),
                    did_you_mean: p.did_you_mean,
                },
                None => {
                    let source = source.get_or_insert_with(|| SourceMap::parse(text));
                    at(source.locate(&p.path), &p.path, p.message, p.did_you_mean)
                }
            })
            .collect(),
    ))
}

/// A config as written: its text and the control plane's resources added to it. The running
/// config keeps this, not the parsed route configs (compiled into route tables, they would be
/// the biggest thing it holds twice); `/config` reads it again on request.
#[derive(Clone)]
pub struct Written {
    pub text: Arc<str>,
    pub dynamic: Option<Arc<xds::Dynamic>>,
}

impl Written {
    /// Text alone (no control plane).
    pub fn text(text: &str) -> Written {
        Written {
            text: text.into(),
            dynamic: None,
        }
    }
}

/// A config read into the schema, before validation.
struct Read {
    raw: RawConfig,
    /// Built only when a problem had to be located on the way.
    source: Option<SourceMap>,
    /// How many listeners, route configs and clusters the text itself defines (the
    /// dynamic resources come after them).
    statics: [usize; 3],
}

/// Reads config text into the schema and adds `dynamic`'s resources: EDS endpoints to the
/// static `type: eds` clusters, and the rest after the static ones.
fn read(
    text: &str,
    dynamic: Option<&xds::Dynamic>,
    at: &Place<'_>,
    files: validate::TlsFiles,
) -> Result<Read, ConfigErrors> {
    // The common case first: the text straight into the schema, with no YAML tree, no
    // copy of it and no source map (for a big mesh they cost several times the config).
    // Only a config with problems pays for locating them.
    // Item by item where the text allows, so that each virtual host is known by its text
    // on the next reload (`reuse`); else whole.
    let direct = items::read_whole(text).or_else(|| serde_yaml_ng::from_str(text).ok());
    let (mut raw, source) = match direct {
        Some(raw) => (raw, None),
        None => {
            let (raw, source) = schema_via_tree(text, at, files)?;
            (raw, Some(source))
        }
    };
    let statics = [
        raw.listeners.len(),
        raw.route_configs.len(),
        raw.clusters.len(),
    ];
    if let Some(d) = dynamic {
        add_dynamic(&mut raw, d);
    }
    Ok(Read {
        raw,
        source,
        statics,
    })
}

/// Adds a control plane's resources to the static config: EDS endpoints to the static
/// `type: eds` clusters, and the rest after the static ones.
fn add_dynamic(raw: &mut RawConfig, d: &xds::Dynamic) {
    for c in raw.clusters.iter_mut() {
        if c.discovery == raw::DiscoveryType::Eds {
            if let Some(endpoints) = d.assignments.get(&c.name) {
                c.endpoints = endpoints.clone();
            }
        }
    }
    raw.listeners.extend(d.listeners.iter().cloned());
    raw.route_configs.extend(d.route_configs.iter().cloned());
    raw.clusters.extend(d.clusters.iter().cloned());
}

/// A config that is (or was) in force, read again as it was validated: for `/config`.
pub fn reread(written: &Written) -> Result<RawConfig, ConfigErrors> {
    let at = |pos: Option<Pos>, path: &[Seg], message: String, did_you_mean: Option<String>| {
        ConfigError {
            file: "<in force>".into(),
            pos,
            path: render_path(path),
            message,
            did_you_mean,
        }
    };
    let dynamic = written.dynamic.as_deref();
    Ok(read(&written.text, dynamic, &at, validate::TlsFiles::NameOnly)?.raw)
}

/// Makes a [`ConfigError`] at a position and field path, with a message and a hint.
type Place<'a> = dyn Fn(Option<Pos>, &[Seg], String, Option<String>) -> ConfigError + 'a;

/// The schema check that reports every problem with its place: the text as a YAML tree,
/// deserialized again and again with each offending field cut out. Returns the config and
/// the source map once the tree deserializes with no error cut out.
fn schema_via_tree(
    text: &str,
    at: &Place<'_>,
    files: validate::TlsFiles,
) -> Result<(RawConfig, SourceMap), ConfigErrors> {
    let mut value: Value = match serde_yaml_ng::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let pos = e.location().map(|l| Pos {
                line: l.line(),
                column: l.column(),
            });
            return Err(ConfigErrors(vec![at(
                pos,
                &[],
                format!("invalid YAML: {e}"),
                None,
            )]));
        }
    };
    // An empty document, or one that is only a tag on nothing, is an empty config (as the
    // direct path reads it).
    let untagged = match &value {
        Value::Tagged(t) => &t.value,
        v => v,
    };
    if untagged.is_null() || untagged.as_str() == Some("") {
        value = Value::Mapping(Default::default());
    }
    let source = SourceMap::parse(text);
    let mut errors = Vec::new();

    // Schema: serde stops at the first error, so report it, cut the offending field out of
    // the tree and try again, until the tree deserializes or the error cannot be cut out.
    let mut raw = None;
    let mut cut: Vec<Vec<Seg>> = Vec::new();
    for _ in 0..200 {
        match serde_path_to_error::deserialize::<_, RawConfig>(value.clone()) {
            Ok(r) => {
                raw = Some(r);
                break;
            }
            Err(e) => {
                let mut path = segments(e.path());
                let message = e.inner().to_string();
                // A required field cut out for its value now reads as missing: that is
                // reported already, and nothing can be cut to go on.
                if let Some(field) = missing_field(&message) {
                    let mut full = path.clone();
                    full.push(Seg::Key(field.to_string()));
                    if cut.contains(&full) {
                        break;
                    }
                }
                let (message, hint, about_key) = explain(&message, &mut path);
                let pos = if about_key {
                    source.locate_key(&path)
                } else {
                    source.locate(&path)
                };
                let quotable = message.ends_with(QUOTE_IT);
                errors.push(at(pos, &path, message, hint));
                // A number or a boolean where a string goes reads on as the string it would
                // be quoted; anything else is cut out.
                if quotable && quote_in_place(&mut value, &path) {
                    continue;
                }
                if !remove_at(&mut value, &path) {
                    break;
                }
                cut.push(path);
            }
        }
    }
    let Some(raw) = raw else {
        return Err(ConfigErrors(errors));
    };
    if !errors.is_empty() {
        // The schema errors were all in cut-out fields; the rest is still worth checking.
        for p in validate::validate(&raw, raw.route_configs.len(), files) {
            errors.push(at(
                source.locate(&p.path),
                &p.path,
                p.message,
                p.did_you_mean,
            ));
        }
        return Err(ConfigErrors(errors));
    }
    Ok((raw, source))
}

/// Whether the direct path accepts only what the tree path accepts, and reads it the same:
/// `Err` names the difference. For the property test over mutated configs.
#[doc(hidden)]
pub fn direct_and_tree_agree(text: &str) -> Result<(), String> {
    let by_items = items::read_whole(text);
    let Ok(direct) = serde_yaml_ng::from_str::<RawConfig>(text) else {
        // The tree path decides alone, if reading item by item refuses too.
        return match by_items {
            Some(_) => Err("reading item by item accepted what reading whole refuses".into()),
            None => Ok(()),
        };
    };
    if by_items.is_some_and(|b| b != direct) {
        return Err("reading item by item gives another config than reading whole".into());
    }
    let at = |pos: Option<Pos>, path: &[Seg], message: String, did_you_mean: Option<String>| {
        ConfigError {
            file: "<tree>".into(),
            pos,
            path: render_path(path),
            message,
            did_you_mean,
        }
    };
    match schema_via_tree(text, &at, validate::TlsFiles::NameOnly) {
        Ok((tree, _)) if tree == direct => Ok(()),
        Ok(_) => Err("the two paths read the config differently".into()),
        Err(e) => Err(format!(
            "the direct path accepted what the tree refuses: {e}"
        )),
    }
}

fn segments(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// Rewrites serde's message for people and finds a did-you-mean in serde's list of
/// expected names. For an unknown field, the path is extended to point at the field, and
/// the third value says the error is about the key rather than its value.
fn explain(message: &str, path: &mut Vec<Seg>) -> (String, Option<String>, bool) {
    if let Some(message) = without_value(message) {
        return (message, None, false);
    }
    let ticked: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default().to_string();
        if path.last() != Some(&Seg::Key(field.clone())) {
            path.push(Seg::Key(field.clone()));
        }
        let hint = did_you_mean(&field, ticked.iter().skip(1).copied());
        return (format!("unknown field `{field}`"), hint, true);
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let variant = rest.split('`').next().unwrap_or_default();
        let expected = ticked
            .iter()
            .skip(1)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let hint = did_you_mean(variant, ticked.iter().skip(1).copied());
        return (
            format!("unknown value `{variant}`, expected one of {expected}"),
            hint,
            false,
        );
    }
    (message.to_string(), None, false)
}

/// Ends the message for a number or a boolean where a string goes.
const QUOTE_IT: &str = " (quote it to make it a string)";

/// serde's "invalid type: integer `5`, expected a string" (or "invalid value: …") without
/// the value, which may be a credential: errors reach the log and the unauthenticated
/// `/config`. The position still points at it.
fn without_value(message: &str) -> Option<String> {
    let (prefix, rest) = ["invalid type: ", "invalid value: "]
        .into_iter()
        .find_map(|p| Some((p, message.strip_prefix(p)?)))?;
    let (found, expected) = rest.rsplit_once(", expected ")?;
    let kind = found
        .split(['`', '"', '\''])
        .next()
        .unwrap_or_default()
        .trim();
    let scalar = matches!(kind, "integer" | "floating point" | "boolean");
    let hint = if scalar && expected == "a string" {
        QUOTE_IT
    } else {
        ""
    };
    Some(format!("{prefix}{kind}, expected {expected}{hint}"))
}

/// The field serde says is missing.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Replaces a number or a boolean at `path` by its text; false for anything else.
fn quote_in_place(value: &mut Value, path: &[Seg]) -> bool {
    let Some(node) = node_at(value, path) else {
        return false;
    };
    let text = match node {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return false,
    };
    *node = Value::String(text);
    true
}

/// The node at `path`, if there is one.
fn node_at<'v>(mut node: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    for seg in path {
        node = match seg {
            Seg::Key(k) => node.get_mut(k.as_str())?,
            Seg::Index(i) => node.get_mut(*i)?,
        };
    }
    Some(node)
}

/// Removes the value at `path` from a mapping; false when that is not possible.
fn remove_at(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let Some(node) = node_at(value, parents) else {
        return false;
    };
    match (last, node) {
        (Seg::Key(k), Value::Mapping(m)) => m.remove(k.as_str()).is_some(),
        _ => false,
    }
}

/// The closest candidate to `word` within a small edit distance.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let limit = (word.len() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        // Ties go to the first in name order: candidates may come from a hash set, and the
        // same config must get the same hint every time.
        .min()
        .map(|(_, c)| c.to_string())
}

/// Optimal string alignment distance: edits, with a swap of neighbours counting as one.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Hex hash of config text, shown in `/config` and used to skip reloads that change nothing.
pub fn hash(text: &str) -> String {
    format!("{:016x}", crate::hash::hash_bytes(text.as_bytes()))
}

/// The hash of config text and of the TLS files it names (`files`, a digest; 0 for none).
pub fn hash_with_files(text: &str, files: u64) -> String {
    if files == 0 {
        return hash(text);
    }
    format!(
        "{:016x}{files:016x}",
        crate::hash::hash_bytes(text.as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same hint every time, whatever order the candidates come in.
    #[test]
    fn ties_in_suggestions_go_to_the_first_name() {
        assert_eq!(did_you_mean("c4", ["c3", "c1", "c2"]), Some("c1".into()));
        assert_eq!(did_you_mean("c4", ["c2", "c3", "c1"]), Some("c1".into()));
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("clustr", ["cluster", "routes"]),
            Some("cluster".into())
        );
        assert_eq!(did_you_mean("zzz", ["cluster", "routes"]), None);
        assert_eq!(did_you_mean("mseh", ["mesh", "edge"]), Some("mesh".into()));
    }

    #[test]
    fn reports_every_unknown_field_with_position() {
        let text = "listeners:\n  - name: a\n    adress: 127.0.0.1:1\n    address: 127.0.0.1:2\n    route_config: r\n    protocl: auto\nroute_configs:\n  - name: r\n    virtual_hosts: []\n";
        let errs = parse(text, "t.yaml").unwrap_err().0;
        let shown: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:#?}");
        assert_eq!(
            shown[0],
            "t.yaml:3:5: listeners[0].adress: unknown field `adress` (did you mean `address`?)"
        );
        assert_eq!(
            shown[1],
            "t.yaml:6:5: listeners[0].protocl: unknown field `protocl` (did you mean `protocol`?)"
        );
    }

    /// YAML's corners, where reading text straight into the schema could differ from
    /// reading a tree: numbers where strings go and back, duplicate keys, anchors, merge
    /// keys, tags, nulls.
    #[test]
    fn the_direct_path_reads_what_the_tree_path_reads() {
        let base = "listeners: [{name: l, address: 127.0.0.1:1, route_config: r}]\nroute_configs: [{name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, cluster: c}]}]}]\n";
        let cases = [
            "clusters: [{name: 1, endpoints: [{address: 127.0.0.1:2}]}]",
            "clusters: [{name: true, endpoints: [{address: 127.0.0.1:2}]}]",
            "clusters: [{name: 1.5, endpoints: [{address: 127.0.0.1:2}]}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2, weight: '2'}]}]",
            "clusters: [{name: c, name: d, endpoints: [{address: 127.0.0.1:2}]}]",
            "clusters: [{name: c, endpoints: &e [{address: 127.0.0.1:2}]}, {name: d, endpoints: *e}]",
            "clusters: [{<<: {name: c}, endpoints: [{address: 127.0.0.1:2}]}]",
            "clusters: [{name: !!str c, endpoints: [{address: 127.0.0.1:2, weight: !!int 3}]}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2}], connect_timeout: ~}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2}], connect_timeout: 5}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2}], connect_timeout: true}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2, weight: 1.0}]}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2, weight: 0x10}]}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2}], protocol: 'http2'}]",
            "clusters: [{name: c, endpoints: [{address: 127.0.0.1:2}], unknown: 1}]",
            "clusters: [{name: !foo c, endpoints: [{address: 127.0.0.1:2}]}]",
            "clusters: [{name: c, endpoints: [{address: ~}]}]",
            "clusters: [{name: c, endpoints: [{address: }]}]",
            "clusters: [{name: c, endpoints: [{address: null}]}]",
            "clusters: [{name: c, endpoints: [{address: '127.0.0.1:2'}], health_check: {path: ~}}]",
        ];
        for case in cases {
            let text = format!("{base}{case}\n");
            direct_and_tree_agree(&text).unwrap_or_else(|e| panic!("{e}: {case}"));
        }
        // A null, an empty value or a number where a string goes is an error on both paths
        // (read straight from text, the scalar's text would have been taken: `value: ~`
        // sent the header value `~`).
        for bad in ["name: 1", "name: ~", "name: ", "name: true", "name: !foo c"] {
            let text =
                format!("{base}clusters: [{{{bad}, endpoints: [{{address: 127.0.0.1:2}}]}}]\n");
            let errors = parse(&text, "t.yaml").expect_err(bad).to_string();
            assert!(errors.contains("clusters[0].name"), "{bad}: {errors}");
        }
        // Found by the `config` fuzz target: a document that is only a tag.
        for whole in ["!!3.-b", "!!str", "!foo", "''", "~"] {
            direct_and_tree_agree(whole).unwrap_or_else(|e| panic!("{e}: {whole}"));
        }
    }

    /// Errors go to the log and to the unauthenticated `/config` (`last_rejected`): they name
    /// where a value is wrong and what kind it is, never the value, which may be a credential.
    #[test]
    fn errors_do_not_echo_values() {
        let base = "listeners: [{name: l, address: 127.0.0.1:1, route_config: r}]\nclusters: [{name: c, endpoints: [{address: 127.0.0.1:2}]}]\nroute_configs: [{name: r, virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /";
        let cases = [
            ("}, cluster: c, request_headers_to_add: [{name: x-api-key, value: 8731946620154473}]}]}]}]", "8731946620154473"),
            ("}, cluster: c, request_headers_to_add: ['authorization: Bearer s3cr3t']}]}]}]", "s3cr3t"),
            ("}, cluster: c, request_headers_to_add: [{name: x-token, value: {s3cr3t: 1}}]}]}]}]", "s3cr3t"),
            (", headers: [{name: authorization, regex: 'Bearer s3cr3t('}]}, cluster: c}]}]}]", "s3cr3t"),
            (", headers: [{name: x-api-key, exact: 123456789012}]}, cluster: c}]}]}]", "123456789012"),
        ];
        for (case, secret) in cases {
            let text = format!("{base}{case}\n");
            let errors = parse(&text, "t.yaml").expect_err(case).to_string();
            assert!(!errors.contains(secret), "{case}: {errors}");
            assert!(errors.contains("routes[0]"), "{case}: {errors}");
        }
    }

    /// A number or a boolean where a string goes is reported once, with what to do, and does
    /// not also read as a missing field; the problems after it are still found.
    #[test]
    fn a_scalar_where_a_string_goes_is_one_error() {
        let text = "clusters:\n  - name: 1\n    endpoints: [{address: 127.0.0.1:2}]\n  - name: c\n    endpoints: [{address: 127.0.0.1:3, weight: x}]\n";
        let errors = parse(text, "t.yaml").unwrap_err().0;
        let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            !lines.iter().any(|l| l.contains("missing field")),
            "{lines:#?}"
        );
        assert!(
            lines[0].starts_with("t.yaml:2:")
                && lines[0].contains("clusters[0].name")
                && lines[0].contains("quote"),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("clusters[1].endpoints[0].weight")),
            "{lines:#?}"
        );
        // A list or a map where a string goes cannot be quoted: it is cut out and reported
        // once, without a missing field after it.
        let text = "clusters: [{name: [a, b], endpoints: [{address: 127.0.0.1:2}]}]\n";
        let errors = parse(text, "t.yaml").unwrap_err().to_string();
        assert!(!errors.contains("missing field"), "{errors}");
        assert!(errors.contains("clusters[0].name"), "{errors}");
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let errs = parse("listeners: [\n  {name: a\n", "bad.yaml")
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 1);
        assert!(errs[0].pos.is_some(), "{}", errs[0]);
        assert!(errs[0].to_string().starts_with("bad.yaml:"));
    }
}
