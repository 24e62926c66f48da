"""The chatbot's conversation, independent of any chat platform's API objects."""
