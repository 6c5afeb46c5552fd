//! Datasets for fine-tuning: loading files of conversations in the shapes users have
//! (ShareGPT, OpenAI messages, Alpaca, prompt/completion, plain text), normalising them once,
//! rendering them with the model's chat template into token ids with assistant-only labels,
//! and cutting them into (optionally packed) batches the trainer consumes.
//!
//! Flow: [`load_dataset`] → [`Dataset`] (shuffle / select / split / concat) →
//! [`tokenize_dataset`] → [`TokenizedDataset`] → [`BatchIterator`] → [`Batch`].

pub mod batch;
pub mod chat_template;
pub mod dataset;
pub mod load;
pub mod preview;
pub mod tokenize;

pub use batch::{Batch, BatchIterator, BatchOptions, Position};
pub use dataset::{Dataset, Message, Record, Row};
pub use load::{load_dataset, Format, LoadOptions, LoadReport, OnError};
pub use preview::preview;
pub use tokenize::{
    stats, tokenize_dataset, tokenize_for_model, DataStats, Lint, TokenizeOptions, TokenizedDataset, TokenizedExample,
    Truncation,
};

/// Label value of tokens the loss ignores (PyTorch / transformers convention).
pub const IGNORE_INDEX: i64 = -100;
