//! The configuration file and how kmirror's settings are resolved (docs/config.md).
//!
//! A file is read from `-f FILE` (or `KMIRROR_CONFIG`), or found as `.kmirror/kmirror.{json,
//! toml,yaml}` (then `.mirrord/mirrord.*`, mirrord's own) in the working directory or the
//! nearest parent that has one, as git finds its repository. Every format is parsed into one
//! positioned tree (`node`), read into the typed configuration (`file`, `read`) with every
//! error located, then merged with the command line and the environment (`settings`):
//! CLI flags > `KMIRROR_*` environment > file > defaults.

pub mod diag;
pub mod file;
pub mod node;
mod parse_json;
mod parse_toml;
mod parse_yaml;
pub mod read;
pub mod schema;
pub mod settings;

use diag::{Diagnostic, Report};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
    Yaml,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }

    pub fn parse(self, text: &str) -> Result<node::Node, node::SyntaxError> {
        match self {
            Format::Json => parse_json::parse(text),
            Format::Toml => parse_toml::parse(text),
            Format::Yaml => parse_yaml::parse(text),
        }
    }
}

/// How the file was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// `-f FILE` or `KMIRROR_CONFIG` (the flag or variable named).
    Given(String),
    /// Found in this directory, searched from the working directory up.
    Discovered { from: PathBuf },
}

/// A configuration file read without errors.
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub found: Found,
    pub read: read::Read,
    /// Other configuration files in the same directory that were not read.
    pub passed_over: Vec<PathBuf>,
}

/// Names tried in each directory, in order: kmirror's own first, then mirrord's.
const DISCOVERED: &[(&str, &str)] = &[(".kmirror", "kmirror"), (".mirrord", "mirrord")];
const EXTENSIONS: &[&str] = &["json", "toml", "yaml", "yml"];

/// Looks for a configuration file in `start` and its parents, up to the file system root.
/// `Err` when one directory holds the same file in several formats (which one is meant?).
pub fn discover(start: &Path) -> Result<Option<(PathBuf, Vec<PathBuf>)>, Report> {
    for dir in start.ancestors() {
        let mut found: Vec<Vec<PathBuf>> = Vec::new();
        for (sub, stem) in DISCOVERED {
            found.push(
                EXTENSIONS
                    .iter()
                    .map(|ext| dir.join(sub).join(format!("{stem}.{ext}")))
                    .filter(|p| p.is_file())
                    .collect(),
            );
        }
        let Some(first) = found.iter().find(|f| !f.is_empty()) else { continue };
        if first.len() > 1 {
            return Err(Report {
                file: None,
                text: String::new(),
                errors: vec![Diagnostic {
                    pos: None,
                    message: format!(
                        "several configuration files in {}: {}",
                        dir.display(),
                        first.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                    help: Some("keep one, or choose one with -f FILE".into()),
                }],
            });
        }
        let chosen = first[0].clone();
        let passed_over = found.into_iter().flatten().filter(|p| *p != chosen).collect();
        return Ok(Some((chosen, passed_over)));
    }
    Ok(None)
}

/// Reads and checks one file; every error it has, located.
pub fn load_file(path: &Path, found: Found, passed_over: Vec<PathBuf>) -> Result<Loaded, Report> {
    let fail =
        |text: String, errors: Vec<Diagnostic>| Report { file: Some(path.to_path_buf()), text, errors };
    let Some(format) = Format::of(path) else {
        return Err(fail(
            String::new(),
            vec![Diagnostic {
                pos: None,
                message: format!("cannot tell the format of {}", path.display()),
                help: Some("name it *.json, *.toml or *.yaml".into()),
            }],
        ));
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            let how = match &found {
                Found::Given(by) => format!(" (given by {by})"),
                Found::Discovered { .. } => String::new(),
            };
            return Err(fail(
                String::new(),
                vec![Diagnostic {
                    pos: None,
                    message: format!("cannot read {}{how}: {e}", path.display()),
                    help: None,
                }],
            ));
        }
    };
    let tree = match format.parse(&text) {
        Ok(tree) => tree,
        Err(e) => {
            return Err(fail(text, vec![Diagnostic::at(e.pos, format!("syntax error: {}", e.message))]));
        }
    };
    let mut read = read::read(&tree);
    if !read.errors.is_empty() {
        read.errors.sort_by_key(|e| e.pos);
        return Err(fail(text, std::mem::take(&mut read.errors)));
    }
    Ok(Loaded { path: path.to_path_buf(), found, read, passed_over })
}

/// The file to use: the one given, else the one discovered from the working directory.
pub fn load(given: Option<(PathBuf, String)>) -> Result<Option<Loaded>, Report> {
    if let Some((path, by)) = given {
        return load_file(&path, Found::Given(by), Vec::new()).map(Some);
    }
    let Ok(cwd) = std::env::current_dir() else { return Ok(None) };
    match discover(&cwd)? {
        Some((path, passed_over)) => load_file(&path, Found::Discovered { from: cwd }, passed_over).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests;

/// The configuration file named by `args` (flag or `KMIRROR_CONFIG`) or discovered.
fn load_for(
    args: &crate::cli::SettingsArgs,
    matches: &clap::ArgMatches,
    sub: &str,
) -> Result<Option<Loaded>, Report> {
    let given = args.config.config_file.clone().map(|path| {
        let by = match crate::cli::origin(matches, sub, "config_file") {
            Some(settings::Source::Env(var)) => var,
            _ => "-f".to_string(),
        };
        (path, by)
    });
    load(given)
}

fn resolve_for<'a>(
    args: &'a crate::cli::SettingsArgs,
    matches: &'a clap::ArgMatches,
    sub: &'a str,
    file: Option<&'a Loaded>,
) -> Result<settings::Settings, String> {
    let origin = |id: &str| crate::cli::origin(matches, sub, id);
    let inputs = settings::Inputs { args, origin: &origin, file };
    settings::resolve(&inputs).map_err(|failure| {
        let mut out = String::new();
        if let Some(f) = file.filter(|_| !failure.file.is_empty()) {
            let text = std::fs::read_to_string(&f.path).unwrap_or_default();
            out.push_str(&Report { file: Some(f.path.clone()), text, errors: failure.file }.render());
        }
        out.push_str(&Report { file: None, text: String::new(), errors: failure.other }.render());
        out
    })
}

/// The settings of `kmirror run`, or the process exits with status 2 after saying why (nothing
/// has been started yet).
pub fn settings_or_exit(args: &crate::cli::SettingsArgs, matches: &clap::ArgMatches) -> settings::Settings {
    let fail = |text: String| -> ! {
        eprint!("{text}");
        eprintln!(
            "kmirror: the configuration has errors; nothing was started (`kmirror verify-config` shows them all)"
        );
        std::process::exit(2)
    };
    let file = load_for(args, matches, "run").unwrap_or_else(|report| fail(report.render()));
    let settings = resolve_for(args, matches, "run", file.as_ref()).unwrap_or_else(|text| fail(text));
    if settings.target.is_none() {
        eprintln!("kmirror: {}", settings::no_target_message(file.as_ref()));
        std::process::exit(2);
    }
    if let Some(f) = &file {
        tracing::info!(file = %f.path.display(), "configuration file");
    }
    settings
}

/// `kmirror verify-config`: the resolved settings (exit status 0) or every error (2).
pub fn verify(args: &crate::cli::SettingsArgs, matches: &clap::ArgMatches) -> i32 {
    let file = match load_for(args, matches, "verify-config") {
        Ok(file) => file,
        Err(report) => {
            print!("{}", report.render());
            println!(
                "{} error{} found",
                report.errors.len(),
                if report.errors.len() == 1 { "" } else { "s" }
            );
            return 2;
        }
    };
    match resolve_for(args, matches, "verify-config", file.as_ref()) {
        Ok(settings) => {
            print!("{}", settings::render(&settings, file.as_ref()));
            0
        }
        Err(text) => {
            print!("{text}");
            2
        }
    }
}
