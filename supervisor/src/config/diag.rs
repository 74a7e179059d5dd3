//! Configuration errors as a user reads them: file, line and column, what is wrong, and what to
//! do, with the offending line quoted as compilers do.

use super::node::Pos;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Where in the file; `None` for errors about the file as a whole or about other sources.
    pub pos: Option<Pos>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn at(pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic { pos: Some(pos), message: message.into(), help: None }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }
}

/// Every error found in one source (a file, or the command line and environment).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The file, if the errors are about one.
    pub file: Option<PathBuf>,
    /// The file's text, to quote lines from.
    pub text: String,
    pub errors: Vec<Diagnostic>,
}

impl Report {
    /// Renders every error, each as `error: ...`, ` --> file:line:col`, the line and a caret.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.errors {
            let _ = writeln!(out, "error: {}", e.message);
            match (&self.file, e.pos) {
                (Some(file), Some(pos)) => {
                    let _ = writeln!(out, "  --> {}:{}", shown(file), pos);
                    if let Some(line) = self.text.lines().nth(pos.line.saturating_sub(1)) {
                        let number = pos.line.to_string();
                        let pad = " ".repeat(number.len());
                        let caret = " ".repeat(pos.col.saturating_sub(1));
                        let _ = writeln!(out, "{pad} |\n{number} | {line}\n{pad} | {caret}^");
                    }
                }
                (Some(file), None) => {
                    let _ = writeln!(out, "  --> {}", shown(file));
                }
                _ => {}
            }
            if let Some(help) = &e.help {
                let _ = writeln!(out, "  = help: {help}");
            }
        }
        out
    }
}

fn shown(file: &Path) -> String {
    file.display().to_string()
}

/// The candidate closest to `wrong` by edit distance, if it is close enough to be a typo.
pub fn closest<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let wrong_lower = wrong.to_ascii_lowercase().replace('-', "_");
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&wrong_lower, &c.to_ascii_lowercase()), c))
        .filter(|&(d, c)| d <= (c.len().max(wrong.len()) / 3).max(2))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_for_typos_only() {
        let keys = ["incoming", "outgoing", "dns", "ipv6"];
        assert_eq!(closest("incomming", keys), Some("incoming"));
        assert_eq!(closest("outgong", keys), Some("outgoing"));
        assert_eq!(closest("DNS", keys), Some("dns"));
        assert_eq!(closest("port-mapping", ["port_mapping", "ports"]), Some("port_mapping"));
        assert_eq!(closest("bananas", keys), None);
    }

    #[test]
    fn renders_location_line_and_caret() {
        let report = Report {
            file: Some("k.yaml".into()),
            text: "a: 1\nfeature:\n  nework: {}\n".into(),
            errors: vec![
                Diagnostic::at(Pos { line: 3, col: 3 }, "unknown key `nework` in `feature`")
                    .with_help("did you mean `network`?"),
            ],
        };
        assert_eq!(
            report.render(),
            "error: unknown key `nework` in `feature`\n  --> k.yaml:3:3\n  |\n3 |   nework: {}\n  |   ^\n  = help: did you mean `network`?\n"
        );
    }
}
