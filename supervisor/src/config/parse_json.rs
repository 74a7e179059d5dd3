//! JSON (RFC 8259, strict: no comments, no trailing commas, as mirrord's serde_json reads it)
//! into a positioned tree. Hand-written because serde_json keeps no positions of keys and
//! values, and every error kmirror reports names its line and column.

use super::node::{Key, Node, Pos, SyntaxError, Value};

/// Deeper nesting than any configuration needs; bounds the recursion.
const MAX_DEPTH: usize = 128;

pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut p = Parser { text, bytes: text.as_bytes(), at: 0 };
    p.skip_ws();
    let node = p.value(0)?;
    p.skip_ws();
    if p.at < p.bytes.len() {
        return Err(p.error("unexpected text after the end of the JSON value"));
    }
    Ok(node)
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn pos(&self) -> Pos {
        Pos::of_offset(self.text, self.at)
    }

    fn error(&self, message: impl Into<String>) -> SyntaxError {
        SyntaxError { pos: self.pos(), message: message.into() }
    }

    fn skip_ws(&mut self) {
        while matches!(self.bytes.get(self.at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let pos = self.pos();
        let value = match self.bytes.get(self.at) {
            None => return Err(self.error("unexpected end of file: expected a value")),
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => Value::Str(self.string()?),
            Some(b't') => self.word("true", Value::Bool(true))?,
            Some(b'f') => self.word("false", Value::Bool(false))?,
            Some(b'n') => self.word("null", Value::Null)?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(b'/') => return Err(self.error("comments are not allowed in JSON")),
            Some(_) => {
                let c = self.text[self.at..].chars().next().unwrap_or('?');
                return Err(self.error(format!("unexpected `{c}`: expected a value")));
            }
        };
        Ok(Node::new(value, pos))
    }

    fn word(&mut self, word: &str, value: Value) -> Result<Value, SyntaxError> {
        if self.bytes[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(self.error("unexpected word: expected a value (strings need double quotes)"))
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.at += 1;
        let mut entries = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.at) == Some(&b'}') {
            self.at += 1;
            return Ok(Value::Map(entries));
        }
        loop {
            self.skip_ws();
            if self.bytes.get(self.at) != Some(&b'"') {
                return Err(self.error(if self.bytes.get(self.at) == Some(&b'}') {
                    "trailing comma before `}`"
                } else {
                    "expected a key in double quotes"
                }));
            }
            let pos = self.pos();
            let name = self.string()?;
            self.skip_ws();
            if self.bytes.get(self.at) != Some(&b':') {
                return Err(self.error("expected `:` after the key"));
            }
            self.at += 1;
            self.skip_ws();
            let value = self.value(depth + 1)?;
            entries.push((Key { name, pos }, value));
            self.skip_ws();
            match self.bytes.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Value::Map(entries));
                }
                _ => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.at += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.at) == Some(&b']') {
            self.at += 1;
            return Ok(Value::Seq(items));
        }
        loop {
            self.skip_ws();
            if self.bytes.get(self.at) == Some(&b']') {
                return Err(self.error("trailing comma before `]`"));
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws();
            match self.bytes.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Seq(items));
                }
                _ => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let start = self.at;
            while let Some(&b) = self.bytes.get(self.at) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
            }
            out.push_str(&self.text[start..self.at]);
            match self.bytes.get(self.at) {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = match self.bytes.get(self.at) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.at += 1;
                            let unit = self.hex4()?;
                            let c = if (0xD800..0xDC00).contains(&unit) {
                                if !self.bytes[self.at..].starts_with(b"\\u") {
                                    return Err(
                                        self.error("a high surrogate must be followed by \\u low surrogate")
                                    );
                                }
                                self.at += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(self.error("invalid low surrogate"));
                                }
                                char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                            } else {
                                char::from_u32(unit)
                            };
                            out.push(c.ok_or_else(|| self.error("invalid \\u escape"))?);
                            continue;
                        }
                        _ => return Err(self.error("invalid escape in string")),
                    };
                    out.push(escaped);
                    self.at += 1;
                }
                Some(_) => return Err(self.error("control character in string (write it as an escape)")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let digits = self.text.get(self.at..self.at + 4).ok_or_else(|| self.error("short \\u escape"))?;
        let unit = u32::from_str_radix(digits, 16).map_err(|_| self.error("invalid \\u escape"))?;
        self.at += 4;
        Ok(unit)
    }

    fn number(&mut self) -> Result<Value, SyntaxError> {
        let start = self.at;
        if self.bytes[self.at] == b'-' {
            self.at += 1;
        }
        let digits = |p: &mut Self| {
            let from = p.at;
            while p.bytes.get(p.at).is_some_and(u8::is_ascii_digit) {
                p.at += 1;
            }
            p.at - from
        };
        let int_start = self.at;
        if digits(self) == 0 {
            return Err(self.error("expected digits"));
        }
        if self.bytes[int_start] == b'0' && self.at - int_start > 1 {
            return Err(SyntaxError {
                pos: Pos::of_offset(self.text, start),
                message: "leading zeros are not allowed".into(),
            });
        }
        let mut float = false;
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            float = true;
            if digits(self) == 0 {
                return Err(self.error("expected digits after `.`"));
            }
        }
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            float = true;
            if matches!(self.bytes.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(self.error("expected digits in the exponent"));
            }
        }
        let text = &self.text[start..self.at];
        let bad = || SyntaxError {
            pos: Pos::of_offset(self.text, start),
            message: format!("`{text}` is out of range"),
        };
        if float {
            text.parse().map(Value::Float).map_err(|_| bad())
        } else {
            text.parse().map(Value::Int).map_err(|_| bad())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, col: usize) -> Pos {
        Pos { line, col }
    }

    #[test]
    fn values_keys_and_their_positions() {
        let text = "{\n  \"target\": \"pid/1\",\n  \"feature\": {\"fs\": [1, -2.5e1, true, null]}\n}";
        let root = parse(text).unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[0].0, Key { name: "target".into(), pos: at(2, 3) });
        assert_eq!(entries[0].1, Node::new(Value::Str("pid/1".into()), at(2, 13)));
        let Value::Map(feature) = &entries[1].1.value else { panic!() };
        let Value::Seq(items) = &feature[0].1.value else { panic!() };
        assert_eq!(items[0].value, Value::Int(1));
        assert_eq!(items[1].value, Value::Float(-25.0));
        assert_eq!(items[2].value, Value::Bool(true));
        assert_eq!(items[3], Node::new(Value::Null, at(3, 39)));
    }

    #[test]
    fn escapes() {
        let n = parse(r#""a\"\\\/\n\u00e9\ud83d\ude00""#).unwrap();
        assert_eq!(n.value, Value::Str("a\"\\/\né😀".into()));
    }

    #[test]
    fn syntax_errors_say_where() {
        for (text, pos, needle) in [
            ("{\"a\": 1,}", at(1, 9), "trailing comma"),
            ("{\"a\" 1}", at(1, 6), "expected `:`"),
            ("{\n  // no\n}", at(2, 3), "expected a key"),
            ("[1 2]", at(1, 4), "expected `,` or `]`"),
            ("{\"a\": tru}", at(1, 7), "unexpected word"),
            ("\"abc", at(1, 5), "unterminated"),
            ("01", at(1, 1), "leading zeros"),
            ("{} x", at(1, 4), "after the end"),
            ("", at(1, 1), "end of file"),
            ("[1,]", at(1, 4), "trailing comma"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.pos, pos, "{text}: {err:?}");
            assert!(err.message.contains(needle), "{text}: {err:?}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(&deep).unwrap_err().message.contains("nested deeper"));
    }
}
