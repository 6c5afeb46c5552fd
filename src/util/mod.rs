//! Small shared helpers.

pub mod files;
pub mod fs;
pub mod fuzz;
pub mod memory;
pub mod permissions;

/// The closest of `candidates` to `word` (for "unknown key `x`; did you mean `y`?").
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
