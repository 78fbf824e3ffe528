"""The Textual app: tabs of chats, the stats panel, themes; headless mode drives the same app from a script."""
