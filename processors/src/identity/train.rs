//! EM training of the m/u probabilities (`chorus identity train`).
