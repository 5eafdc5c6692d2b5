"""The modules users build with: RoPE, the mLSTM attention backend and its decoding
states, and the layers around it (mixer, block, language model)."""
