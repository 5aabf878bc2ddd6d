//! placeholder: the gemini protocol (being written).
