//! Finding the program to run, with a shell's exit codes for what cannot run.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}: command not found")]
    NotFound(String),
    #[error("{0}: permission denied (not an executable file)")]
    NotExecutable(String),
    #[error(
        "{0} is a 32-bit program; kmirror intercepts only 64-bit x86_64 system calls, so it \
         cannot run it. Build it for x86_64"
    )]
    ThirtyTwoBit(String),
}

impl CommandError {
    /// The exit status a shell uses for the same failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::NotFound(_) => 127,
            CommandError::NotExecutable(_) | CommandError::ThirtyTwoBit(_) => 126,
        }
    }
}

fn is_executable_file(p: &Path) -> bool {
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Resolves `program` like execvp: a name with a slash is used as is, otherwise it is looked
/// up in `path` (the app's PATH).
pub fn resolve(program: &OsStr, path: Option<&OsStr>) -> Result<PathBuf, CommandError> {
    let shown = program.to_string_lossy().into_owned();
    let candidate = if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        if !p.exists() {
            return Err(CommandError::NotFound(shown));
        }
        p
    } else {
        let dirs = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
        std::env::split_paths(dirs)
            .map(|d| d.join(program))
            .find(|p| is_executable_file(p))
            .ok_or(CommandError::NotFound(shown.clone()))?
    };
    if !is_executable_file(&candidate) {
        return Err(CommandError::NotExecutable(shown));
    }
    if elf_class(&candidate) == Some(1) {
        return Err(CommandError::ThirtyTwoBit(shown));
    }
    Ok(candidate)
}

/// EI_CLASS of an ELF file (1 = 32-bit, 2 = 64-bit); `None` for scripts and other files.
fn elf_class(p: &Path) -> Option<u8> {
    use std::io::Read;
    let mut head = [0u8; 5];
    std::fs::File::open(p).ok()?.read_exact(&mut head).ok()?;
    (head[..4] == *b"\x7fELF").then_some(head[4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_a_shell() {
        assert!(resolve(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin"))).is_ok());
        let missing = resolve(OsStr::new("no-such-cmd-kmirror"), Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(missing.exit_code(), 127);
        let dir = std::env::temp_dir().join(format!("kmirror-noexec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::write(&plain, b"data").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(resolve(plain.as_os_str(), None).unwrap_err().exit_code(), 126);
        std::fs::remove_dir_all(dir).unwrap();
        assert_eq!(resolve(OsStr::new("./does/not/exist"), None).unwrap_err().exit_code(), 127);
    }

    #[test]
    fn refuses_32_bit_elf() {
        let dir = std::env::temp_dir().join(format!("kmirror-elf32-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("prog32");
        std::fs::write(&p, b"\x7fELF\x01\x01\x01\0rest").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = resolve(p.as_os_str(), None).unwrap_err();
        assert!(matches!(err, CommandError::ThirtyTwoBit(_)));
        assert_eq!(err.exit_code(), 126);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
