"""Modal dialogs: new tab, rename, confirm close."""
