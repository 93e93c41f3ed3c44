//! Maps a field path (`clusters[2].endpoints[0].address`) to its line and column in the file.
//!
//! serde_yaml_ng parses the config but keeps no positions once a value is built, so this
//! module reads the same text once more with saphyr-parser's event stream, which carries a
//! position for every key and value, and keeps just enough of the tree to answer look-ups.

use saphyr_parser::{Event, Parser};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path the way errors show it: `route_configs[0].virtual_hosts[1].domains`.
pub fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

#[derive(Debug)]
struct Node {
    pos: Pos,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Map(Vec<(String, Pos, Node)>),
    Seq(Vec<Node>),
    Leaf,
}

/// Positions of every key and value in one YAML document.
#[derive(Debug, Default)]
pub struct SourceMap {
    root: Option<Node>,
}

impl SourceMap {
    /// Reads `text`. A document this parser cannot read yields an empty map: serde_yaml_ng
    /// reports the syntax error itself, with its own position.
    pub fn parse(text: &str) -> SourceMap {
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<Builder> = Vec::new();
        let mut root = None;
        while let Some(Ok((event, span))) = parser.next_event() {
            let pos = Pos {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            let finished = match event {
                Event::Scalar(value, ..) => Some(Finished::Scalar(value.into_owned(), pos)),
                Event::Alias(_) => Some(Finished::Node(Node {
                    pos,
                    kind: Kind::Leaf,
                })),
                Event::SequenceStart(..) => {
                    stack.push(Builder::Seq(pos, Vec::new()));
                    None
                }
                Event::MappingStart(..) => {
                    stack.push(Builder::Map(pos, Vec::new(), None));
                    None
                }
                Event::SequenceEnd | Event::MappingEnd => stack.pop().map(|b| match b {
                    Builder::Seq(pos, items) => Finished::Node(Node {
                        pos,
                        kind: Kind::Seq(items),
                    }),
                    Builder::Map(pos, entries, _) => Finished::Node(Node {
                        pos,
                        kind: Kind::Map(entries),
                    }),
                }),
                Event::DocumentEnd => break,
                _ => None,
            };
            let Some(finished) = finished else { continue };
            match stack.last_mut() {
                None => {
                    root = Some(finished.into_node());
                }
                Some(Builder::Seq(_, items)) => items.push(finished.into_node()),
                Some(Builder::Map(_, entries, pending_key)) => match pending_key.take() {
                    None => {
                        *pending_key = Some(match finished {
                            Finished::Scalar(key, pos) => (key, pos),
                            Finished::Node(node) => (String::new(), node.pos),
                        })
                    }
                    Some((key, key_pos)) => entries.push((key, key_pos, finished.into_node())),
                },
            }
        }
        SourceMap { root }
    }

    /// The position of the value at `path`, or of the nearest ancestor found.
    pub fn locate(&self, path: &[Seg]) -> Option<Pos> {
        self.find(path, false)
    }

    /// Like [`SourceMap::locate`], but a path that ends on a key points at the key itself
    /// (for errors about the key, such as an unknown field).
    pub fn locate_key(&self, path: &[Seg]) -> Option<Pos> {
        self.find(path, true)
    }

    fn find(&self, path: &[Seg], key_at_end: bool) -> Option<Pos> {
        let mut node = self.root.as_ref()?;
        let mut best = node.pos;
        for seg in path {
            let next = match (&node.kind, seg) {
                (Kind::Map(entries), Seg::Key(k)) => entries
                    .iter()
                    .find(|(key, _, _)| key == k)
                    .map(|(_, key_pos, child)| (*key_pos, child)),
                (Kind::Seq(items), Seg::Index(i)) => items.get(*i).map(|c| (c.pos, c)),
                _ => None,
            };
            match next {
                Some((key_pos, child)) => {
                    best = if key_at_end { key_pos } else { child.pos };
                    node = child;
                }
                None => break,
            }
        }
        Some(best)
    }
}

enum Builder {
    Seq(Pos, Vec<Node>),
    Map(Pos, Vec<(String, Pos, Node)>, Option<(String, Pos)>),
}

enum Finished {
    Scalar(String, Pos),
    Node(Node),
}

impl Finished {
    fn into_node(self) -> Node {
        match self {
            Finished::Scalar(_, pos) => Node {
                pos,
                kind: Kind::Leaf,
            },
            Finished::Node(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Seg {
        Seg::Key(k.to_string())
    }

    #[test]
    fn finds_keys_and_items_in_block_and_flow_style() {
        let text = "clusters:\n  - name: a\n    endpoints: [{ address: x }, { address: y }]\n  - name: b\n";
        let map = SourceMap::parse(text);
        let at = |p: &[Seg]| map.locate(p).unwrap();
        assert_eq!(
            map.locate_key(&[key("clusters")]),
            Some(Pos { line: 1, column: 1 })
        );
        assert_eq!(
            at(&[key("clusters"), Seg::Index(1), key("name")]),
            Pos {
                line: 4,
                column: 11
            }
        );
        let addr = at(&[
            key("clusters"),
            Seg::Index(0),
            key("endpoints"),
            Seg::Index(1),
            key("address"),
        ]);
        assert_eq!(
            addr,
            Pos {
                line: 3,
                column: 44
            }
        );
        // A missing key falls back to its parent.
        assert_eq!(
            at(&[key("clusters"), Seg::Index(1), key("nope")]),
            Pos { line: 4, column: 5 }
        );
        assert_eq!(
            render_path(&[key("clusters"), Seg::Index(1), key("name")]),
            "clusters[1].name"
        );
    }
}
