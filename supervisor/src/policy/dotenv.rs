//! dotenv files (`feature.env.env_file`, `--env-file`): `NAME=value` lines, as mirrord and
//! docker read them.
//!
//! Accepted: blank lines and `#` comments; an optional `export ` prefix; values unquoted
//! (trimmed; a ` #` starts a comment), in single quotes (taken literally) or in double quotes
//! (`\n`, `\t`, `\"`, `\\` escapes; may span lines). No variable expansion: `$X` stays `$X`.

/// Parses a dotenv file; the error names the line.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let number = index + 1;
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let (name, rest) =
            line.split_once('=').ok_or_else(|| format!("line {number}: expected NAME=value"))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') {
            return Err(format!("line {number}: `{name}` is not a variable name"));
        }
        let rest = rest.trim_start();
        let value = if let Some(quoted) = rest.strip_prefix('\'') {
            let end = quoted.find('\'').ok_or_else(|| format!("line {number}: unterminated '"))?;
            quoted[..end].to_string()
        } else if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut text = quoted.to_string();
            loop {
                let mut chars = text.chars();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => {
                            closed = true;
                            break;
                        }
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some('r') => value.push('\r'),
                            Some(other) => {
                                if !matches!(other, '"' | '\\' | '$') {
                                    value.push('\\');
                                }
                                value.push(other);
                            }
                            None => value.push('\\'),
                        },
                        c => value.push(c),
                    }
                }
                if closed {
                    break;
                }
                let (_, next) = lines.next().ok_or_else(|| format!("line {number}: unterminated \""))?;
                value.push('\n');
                text = next.to_string();
            }
            value
        } else {
            let end = rest.find(" #").unwrap_or(rest.len());
            rest[..end].trim_end().to_string()
        };
        out.push((name.to_string(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_usual_forms() {
        let text = "# comment\n\nA=1\nexport B = two words # note\nC='lit $X \\n'\nD=\"x\\ny \\\"q\\\"\"\nE=\"multi\nline\"\nF=\nG=a=b\n";
        let vars = parse(text).unwrap();
        let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("lit $X \\n"));
        assert_eq!(get("D"), Some("x\ny \"q\""));
        assert_eq!(get("E"), Some("multi\nline"));
        assert_eq!(get("F"), Some(""));
        assert_eq!(get("G"), Some("a=b"));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("A=1\nnot a pair\n").unwrap_err(), "line 2: expected NAME=value");
        assert!(parse("A=\"open\n").unwrap_err().contains("line 1"));
        assert!(parse("BAD NAME=1\n").unwrap_err().contains("line 1"));
    }
}
