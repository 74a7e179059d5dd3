//! YAML into a positioned tree, from the events of `saphyr-parser` (a maintained, pure-Rust
//! YAML 1.2 parser whose events carry their positions; serde_yaml is unmaintained). Plain
//! scalars are typed by the YAML 1.2 core schema, so `on`/`yes` stay strings, as in mirrord.

use super::node::{Key, Node, Pos, SyntaxError, Value};
use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use std::collections::HashMap;

/// Nodes an alias may expand to in all, so that a few lines of anchors cannot make a tree of
/// billions of nodes.
const MAX_NODES: usize = 100_000;
const MAX_DEPTH: usize = 128;

pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut reader = Reader { events: Parser::new_from_str(text), anchors: HashMap::new(), nodes: 0 };
    let mut document = None;
    loop {
        let (event, span) = reader.next()?;
        match event {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                if document.is_some() {
                    return Err(SyntaxError {
                        pos: pos(&span),
                        message: "a configuration file holds one YAML document, not several".into(),
                    });
                }
                let (first, first_span) = reader.next()?;
                document = Some(if matches!(first, Event::DocumentEnd) {
                    Node::new(Value::Null, pos(&first_span))
                } else {
                    reader.node(first, first_span, 0)?
                });
            }
            other => {
                return Err(SyntaxError {
                    pos: pos(&span),
                    message: format!("unexpected YAML event {other:?}"),
                });
            }
        }
    }
    Ok(document.unwrap_or(Node::new(Value::Null, Pos { line: 1, col: 1 })))
}

fn pos(span: &Span) -> Pos {
    Pos { line: span.start.line(), col: span.start.col() + 1 }
}

struct Reader<'a> {
    events: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), SyntaxError> {
        match self.events.next() {
            Some(Ok(event)) => Ok(event),
            Some(Err(e)) => Err(SyntaxError {
                pos: Pos { line: e.marker().line(), col: e.marker().col() + 1 },
                message: e.info().to_string(),
            }),
            None => {
                Err(SyntaxError { pos: Pos::default(), message: "unexpected end of the YAML stream".into() })
            }
        }
    }

    fn count(&mut self, n: usize, at: Pos) -> Result<(), SyntaxError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos: at,
                message: format!("more than {MAX_NODES} values (aliases expand)"),
            });
        }
        Ok(())
    }

    fn node(&mut self, event: Event<'a>, span: Span, depth: usize) -> Result<Node, SyntaxError> {
        let at = pos(&span);
        if depth > MAX_DEPTH {
            return Err(SyntaxError { pos: at, message: format!("nested deeper than {MAX_DEPTH} levels") });
        }
        self.count(1, at)?;
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string =
                    tag.as_ref().is_some_and(|t| t.handle == "tag:yaml.org,2002:" && t.suffix == "str")
                        || tag.as_ref().is_some_and(|t| t.handle == "!!" && t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    plain_scalar(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                (Node::new(value, at), anchor)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(event, span, depth + 1)?);
                }
                (Node::new(Value::Seq(items), at), anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    let name = match event {
                        Event::MappingEnd => break,
                        Event::Scalar(text, ..) => text.into_owned(),
                        _ => {
                            return Err(SyntaxError {
                                pos: pos(&span),
                                message: "keys must be plain strings, not lists or tables".into(),
                            });
                        }
                    };
                    let key = Key { name, pos: pos(&span) };
                    let (event, span) = self.next()?;
                    entries.push((key, self.node(event, span, depth + 1)?));
                }
                (Node::new(Value::Map(entries), at), anchor)
            }
            Event::Alias(id) => {
                let target = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or(SyntaxError { pos: at, message: "alias of an unknown anchor".into() })?;
                self.count(size(&target), at)?;
                return Ok(Node::new(target.value, at));
            }
            other => {
                return Err(SyntaxError { pos: at, message: format!("unexpected YAML event {other:?}") });
            }
        };
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }
}

fn size(node: &Node) -> usize {
    1 + match &node.value {
        Value::Seq(items) => items.iter().map(size).sum(),
        Value::Map(entries) => entries.iter().map(|(_, v)| size(v)).sum(),
        _ => 0,
    }
}

/// The YAML 1.2 core schema's reading of a plain scalar.
fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let (digits, radix) = if let Some(hex) = text.strip_prefix("0x") {
        (hex, 16)
    } else if let Some(oct) = text.strip_prefix("0o") {
        (oct, 8)
    } else {
        (text, 10)
    };
    let decimal = radix == 10
        && !digits.is_empty()
        && digits.trim_start_matches(['-', '+']).bytes().all(|b| b.is_ascii_digit())
        && digits.trim_start_matches(['-', '+']).len() + 1 >= digits.len();
    if (decimal || (radix != 10 && !digits.is_empty() && !digits.starts_with(['-', '+'])))
        && let Ok(n) = i128::from_str_radix(digits, radix)
    {
        return Value::Int(n);
    }
    let float_like = text.bytes().any(|b| b.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if float_like && let Ok(f) = text.parse::<f64>() {
        return Value::Float(f);
    }
    Value::Str(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_sequences_scalars_and_positions() {
        let text = "target: pid/1\nfeature:\n  network:\n    incoming:\n      mode: steal\n      ports: [80, 8080]\n  env:\n    override: {A: '1', B: 2}\n";
        let root = parse(text).unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[0].0, Key { name: "target".into(), pos: Pos { line: 1, col: 1 } });
        assert_eq!(entries[0].1, Node::new(Value::Str("pid/1".into()), Pos { line: 1, col: 9 }));
        let Value::Map(feature) = &entries[1].1.value else { panic!() };
        let Value::Map(network) = &feature[0].1.value else { panic!() };
        let Value::Map(incoming) = &network[0].1.value else { panic!() };
        assert_eq!(incoming[0].0.pos, Pos { line: 5, col: 7 });
        let Value::Seq(ports) = &incoming[1].1.value else { panic!() };
        assert_eq!(ports[1], Node::new(Value::Int(8080), Pos { line: 6, col: 19 }));
        let Value::Map(env) = &feature[1].1.value else { panic!() };
        let Value::Map(over) = &env[0].1.value else { panic!() };
        assert_eq!(over[0].1.value, Value::Str("1".into()), "quoted stays a string");
        assert_eq!(over[1].1.value, Value::Int(2));
    }

    #[test]
    fn core_schema_scalars() {
        for (text, value) in [
            ("~", Value::Null),
            ("true", Value::Bool(true)),
            ("yes", Value::Str("yes".into())),
            ("on", Value::Str("on".into())),
            ("0x10", Value::Int(16)),
            ("0o17", Value::Int(15)),
            ("-42", Value::Int(-42)),
            ("1.5", Value::Float(1.5)),
            ("1e3", Value::Float(1000.0)),
            ("5432", Value::Int(5432)),
            ("tcp://:5432", Value::Str("tcp://:5432".into())),
            ("10.0.0.0/8", Value::Str("10.0.0.0/8".into())),
            ("1.2.3.4", Value::Str("1.2.3.4".into())),
            ("-", Value::Str("-".into())),
        ] {
            assert_eq!(plain_scalar(text), value, "{text}");
        }
        assert_eq!(parse("a: !!str 42\n").unwrap().value, parse("a: '42'\n").unwrap().value);
    }

    #[test]
    fn anchors_expand_within_a_bound() {
        let root = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[1].1.value, entries[0].1.value);
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let prev = format!("*a{}", i - 1);
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", [prev.as_str(); 10].join(", ")));
        }
        assert!(parse(&bomb).unwrap_err().message.contains("more than"));
    }

    #[test]
    fn errors_say_where() {
        let err = parse("a: 1\n b: [\n").unwrap_err();
        assert!(err.pos.line >= 2, "{err:?}");
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("one YAML document"), "{err:?}");
        assert_eq!(parse("").unwrap().value, Value::Null);
        assert_eq!(parse("# only a comment\n").unwrap().value, Value::Null);
    }
}
