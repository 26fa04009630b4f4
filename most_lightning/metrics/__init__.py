"""Pure metrics, shared by the eval tasks (eval/) and the LitModule (lit/): WER/CER of transcripts, text
normalisation, token-weighted means, expert load per modality, and small task scores. No model, data or
Lightning code here."""
