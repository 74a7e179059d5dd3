//! TOML into a positioned tree, with the `toml` crate's spanned document parser (byte spans of
//! every key and value).

use super::node::{Key, Node, Pos, SyntaxError, Value};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let table = DeTable::parse(text).map_err(|e| SyntaxError {
        pos: Pos::of_offset(text, e.span().map_or(0, |s| s.start)),
        message: e.message().trim().to_string(),
    })?;
    let pos = Pos::of_offset(text, table.span().start);
    Ok(Node::new(map(text, table.get_ref()), pos))
}

fn map(text: &str, table: &DeTable<'_>) -> Value {
    Value::Map(
        table
            .iter()
            .map(|(k, v)| {
                let key = Key { name: k.get_ref().to_string(), pos: Pos::of_offset(text, k.span().start) };
                (key, node(text, v))
            })
            .collect(),
    )
}

fn node(text: &str, v: &Spanned<DeValue<'_>>) -> Node {
    let pos = Pos::of_offset(text, v.span().start);
    let value = match v.get_ref() {
        DeValue::String(s) => Value::Str(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            let (negative, digits) = match digits.strip_prefix('-') {
                Some(rest) => (true, rest.to_string()),
                None => (false, digits.trim_start_matches('+').to_string()),
            };
            match i128::from_str_radix(&digits, i.radix()) {
                Ok(n) if negative => Value::Int(-n),
                Ok(n) => Value::Int(n),
                Err(_) => Value::Str(i.as_str().to_string()),
            }
        }
        DeValue::Float(f) => f.as_str().replace('_', "").parse().map_or(Value::Float(f64::NAN), Value::Float),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::Str(d.to_string()),
        DeValue::Array(items) => Value::Seq(items.iter().map(|item| node(text, item)).collect()),
        DeValue::Table(t) => map(text, t),
    };
    Node::new(value, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_tables_and_positions() {
        let text =
            "target = \"pid/1\"\n\n[feature.network.incoming]\nmode = \"steal\"\nports = [80, 0x1F90]\n";
        let root = parse(text).unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[0].0, Key { name: "target".into(), pos: Pos { line: 1, col: 1 } });
        assert_eq!(entries[0].1.pos, Pos { line: 1, col: 10 });
        let Value::Map(feature) = &entries[1].1.value else { panic!() };
        let Value::Map(network) = &feature[0].1.value else { panic!() };
        let Value::Map(incoming) = &network[0].1.value else { panic!() };
        assert_eq!(incoming[0].0.pos, Pos { line: 4, col: 1 });
        assert_eq!(incoming[0].1.value, Value::Str("steal".into()));
        let Value::Seq(ports) = &incoming[1].1.value else { panic!() };
        assert_eq!(ports[1].value, Value::Int(8080));
        assert_eq!(ports[1].pos, Pos { line: 5, col: 14 });
    }

    #[test]
    fn syntax_errors_say_where() {
        let err = parse("a = 1\nb = \n").unwrap_err();
        assert_eq!(err.pos.line, 2, "{err:?}");
        let err = parse("a = 1\na = 2\n").unwrap_err();
        assert_eq!(err.pos.line, 2, "{err:?}");
        assert!(err.message.contains("duplicate"), "{err:?}");
    }
}
