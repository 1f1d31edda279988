"""Data: readers, formats, chat-template rendering, packing. Heavy libraries are imported lazily."""
from tunesmith.data.conversation import Conversation, Message, Source, as_chat
from tunesmith.data.dataset import SFTData, load_sft_data, read_conversations, validate_data
from tunesmith.data.packing import Example, collate, pack_examples, shift_labels
from tunesmith.data.preference import (PairExample, PreferencePair, collate_pairs, load_preference_data,
                                       read_preferences, tokenize_pair)
from tunesmith.data.render import (IGNORE, end_of_turn_ids, render_prompt, set_chat_template,
                                   tokenize_conversation)

__all__ = ["Conversation", "Message", "Source", "as_chat", "SFTData", "load_sft_data", "read_conversations",
           "validate_data", "Example", "collate", "pack_examples", "shift_labels", "IGNORE",
           "end_of_turn_ids", "render_prompt", "set_chat_template", "tokenize_conversation",
           "PairExample", "PreferencePair", "collate_pairs", "load_preference_data", "read_preferences",
           "tokenize_pair"]
