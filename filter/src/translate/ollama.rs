//! placeholder: the ollama protocol (being written).
